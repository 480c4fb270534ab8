# Workload "python3" of suite alloc: allocation-heavy Python. Builds a list
# of small dicts and strings, sorts it, round-trips it through json, groups
# and summarizes it. Deterministic: prints sizes and a summary, the same
# for every allocator.
#
#   python3 alloc_python.py [RECORDS = 100000]
#
# scripts/bench runs it with PYTHONMALLOC=malloc: CPython's own small-object
# allocator (pymalloc) would otherwise serve every object up to 512 bytes
# from its 256 KiB arenas, and the allocator under test would see only a few
# thousand calls.
import json
import sys

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def build(count):
    records = []
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        records.append({
            "id": i,
            "name": f"{word}-{i * 7919 % 100003}",
            "tags": [word, str(i % 97)],
            "score": (i * 2654435761) % 1000 / 7.0,
        })
    return records


def count_tokens(text):
    counts = {}
    for token in text.replace('"', " ").replace(",", " ").split():
        counts[token] = counts.get(token, 0) + 1
    return counts


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    records = build(count)
    records.sort(key=lambda r: (r["name"], r["id"]))
    text = json.dumps(records)
    back = json.loads(text)
    groups = {}
    for record in back:
        groups.setdefault(record["tags"][1], []).append(record["name"].upper())
    summary = sorted(f"{key}:{len(names)}:{max(names)}" for key, names in groups.items())
    tokens = count_tokens(text)
    print(len(text), len(back), sum(len(names) for names in groups.values()), len(tokens))
    print(" ".join(summary[:20]))


if __name__ == "__main__":
    main()
