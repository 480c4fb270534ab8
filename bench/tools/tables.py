#!/usr/bin/python3
"""Markdown tables of the micro, alloc and profile suites (called by scripts/bench).

  tables.py micro WORK_DIR NAME=LABEL...
      WORK_DIR/NAME-ROUND.json: Google Benchmark's JSON output of one run of
      hotpool-micro under allocator NAME. Prints one table per benchmark
      family (ns per malloc+free pair, median over the rounds, and the ratio
      to the first allocator, glibc) and a summary of geometric means.

  tables.py alloc RUNS_TSV WORKLOADS_TSV PLOT_SCRIPT PLOT_OUTPUT NAME=LABEL...
      RUNS_TSV: one line per timed run (round, workload, allocator, cpu_us,
      user_us, sys_us, wall_us, maxrss_kb, status, same_output);
      WORKLOADS_TSV: one line per workload (workload, description,
      allocations, pool_hits, note). Prints the CPU time and peak RSS tables
      (medians, ratios to glibc, geometric means) and the workload table,
      and writes PLOT_SCRIPT, a gnuplot script (data inline) that draws
      the ratios into PLOT_OUTPUT (SVG).

  tables.py pool-share DIR
      Sums totals.allocations and totals.pool_hits over hotpool's JSON
      reports in DIR; prints "allocations pool_hits".

  tables.py profile RUNS_TSV COUNTS_TSV META_TSV MICRO_DIR NAME=LABEL...
      Suite profile. RUNS_TSV: one line per timed run (round, workload,
      config, cpu_us, user_us, sys_us, wall_us, maxrss_kb, status,
      same_output); COUNTS_TSV: per workload, the paths of hotpool's JSON
      reports (HOTPOOL_SAMPLE=1 and default), of heaptrack's stderr and of
      heaptrack_print's output; META_TSV: key TAB value (targets, rounds,
      callgrind counts); MICRO_DIR: hotpool-micro's JSON output per
      configuration and round. Prints the CPU time and peak RSS tables
      (medians, ratios to the first configuration, per-round ratio ranges,
      targets), the count comparison with heaptrack and the cost of one
      sampled allocation.

  tables.py heaptrack-stdout IN OUT
      Writes to OUT the stdout of heaptrack's run IN less heaptrack's own
      lines (the three before the program starts, the ones after it ends),
      so that it can be compared with a run without heaptrack.

The first NAME is the baseline of every ratio. Only the standard library is
used, so Debian's python3 runs it as it is.
"""
import collections
import csv
import glob
import json
import math
import os
import re
import statistics
import sys

TIME_UNIT_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


def parse_allocators(args):
    allocators = []
    for arg in args:
        name, _, label = arg.partition("=")
        allocators.append((name, label or name))
    return allocators


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def fmt_mean_of(by_workload, expected):
    """The geometric mean of a {workload: ratio} row; '(of N)' when some are missing."""
    value = geomean(list(by_workload.values()))
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if len(by_workload) < expected:
        text += f" (of {len(by_workload)})"
    return text


def paired_table(title, workloads, columns, ratios_of):
    """Ratios paired by round: a round runs a workload under every
    configuration back to back, so the machine's drift between rounds (on a
    shared machine often larger than the differences measured) cancels out
    of each round's ratio. ratios_of(workload, name): that configuration's
    per-round ratios. Prints their medians and geometric means; returns
    {name: {workload: median}}."""
    print(f"### {title}\n")
    print("| workload | " + " | ".join(label for _, label in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    medians = collections.defaultdict(dict)
    for w in workloads:
        cells = []
        for name, _ in columns:
            values = ratios_of(w, name)
            if values:
                medians[name][w] = statistics.median(values)
                cells.append(f"{medians[name][w]:.3f}")
            else:
                cells.append("-")
        print(f"| {w} | " + " | ".join(cells) + " |")
    print("| **geometric mean** | " + " | ".join(
        f"**{fmt_mean_of(medians[name], len(workloads))}**" for name, _ in columns) + " |\n")
    return medians


def fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def fmt_ns(value):
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def fmt_size(size):
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------- micro

MICRO_FAMILIES = [
    (("pair", 1), "pair, 1 thread: malloc, write a byte, free"),
    (("pair", 2), "pair, 2 threads: each thread malloc, write a byte, free"),
    (("batch", 1), "batch, 1 thread: 32 mallocs, then the 32 frees in allocation order (per pair)"),
    (("batch", 2), "batch, 2 threads: each thread 32 mallocs, then 32 frees (per pair)"),
    (("producer_consumer", 1), "producer/consumer, one CPU: one thread mallocs, another frees, both pinned to one CPU (CPU time of both threads, per pair)"),
    (("producer_consumer", 2), "producer/consumer, two CPUs: one thread mallocs, another frees, pinned to two CPUs (CPU time of both threads, per pair)"),
]


def micro(work_dir, allocator_args):
    allocators = parse_allocators(allocator_args)
    # samples[name][(family, threads, size)] = [ns per pair, one per round]
    samples = {name: collections.defaultdict(list) for name, _ in allocators}
    rounds = {}
    for name, _ in allocators:
        # NAME-ROUND.json only: hotpool-fixed-*.json would take in
        # hotpool-fixed-nochecks-ROUND.json too.
        files = sorted(path for path in glob.glob(os.path.join(work_dir, f"{name}-*.json"))
                       if os.path.basename(path)[len(name) + 1:-len(".json")].isdigit())
        rounds[name] = len(files)
        for path in files:
            with open(path) as f:
                data = json.load(f)
            for run in data["benchmarks"]:
                if run.get("run_type", "iteration") != "iteration" or run.get("error_occurred") or run.get("skipped"):
                    continue
                parts = run["run_name"].split("/")
                family, size = parts[0], int(parts[1])
                threads = int(run.get("threads", 1))
                for part in parts[2:]:  # producer_consumer: cpus:C takes the place of threads
                    if part.startswith("cpus:"):
                        threads = int(part[5:])
                pairs = float(run.get("pairs_per_iteration", 1.0))
                ns = run["cpu_time"] * TIME_UNIT_NS[run.get("time_unit", "ns")] / pairs
                samples[name][(family, threads, size)].append(ns)

    base = allocators[0][0]
    median = {name: {key: statistics.median(v) for key, v in runs.items()} for name, runs in samples.items()}
    header = "| size | " + " | ".join(label for _, label in allocators) + " |"
    rule = "|---:|" + "---:|" * len(allocators)
    summary = {}
    for (family, threads), title in MICRO_FAMILIES:
        sizes = sorted({key[2] for runs in median.values() for key in runs if key[:2] == (family, threads)})
        if not sizes:
            continue
        print(f"### {title}\n")
        print(header)
        print(rule)
        ratios = collections.defaultdict(list)
        for size in sizes:
            key = (family, threads, size)
            base_ns = median[base].get(key)
            cells = []
            for name, _ in allocators:
                ns = median[name].get(key)
                if ns is None:
                    # "-": not run (no rounds, or not this family: the floor);
                    # "failed": the family ran, this size did not.
                    ran = rounds[name] and any(k[:2] == (family, threads) for k in median[name])
                    cells.append("failed" if ran else "-")
                elif name == base or base_ns is None:
                    cells.append(fmt_ns(ns))
                else:
                    ratio = ns / base_ns
                    ratios[name].append(ratio)
                    cells.append(f"{fmt_ns(ns)} ({ratio:.2f})")
            print(f"| {fmt_size(size)} | " + " | ".join(cells) + " |")
        row = []
        for name, _ in allocators:
            value = 1.0 if name == base else geomean(ratios[name])
            summary.setdefault(name, {})[(family, threads)] = value
            row.append(fmt_ratio(value))
        print("| **geomean ratio** | " + " | ".join(f"**{cell}**" for cell in row) + " |\n")

    print("### Summary: geometric mean of the ratios to glibc over the sizes\n")
    print("| benchmark | " + " | ".join(label for _, label in allocators) + " |")
    print("|---|" + "---:|" * len(allocators))
    for (family, threads), title in MICRO_FAMILIES:
        if (family, threads) not in summary[base]:
            continue
        short = title.split(":")[0]
        print(f"| {short} | " + " | ".join(fmt_ratio(summary[name].get((family, threads))) for name, _ in allocators) + " |")
    overall = [geomean([v for v in summary[name].values()]) for name, _ in allocators]
    print("| **all** | " + " | ".join(f"**{fmt_ratio(v)}**" for v in overall) + " |")


# ---------------------------------------------------------------- alloc

def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def alloc(runs_path, workloads_path, plot_script, plot_output, allocator_args):
    allocators = parse_allocators(allocator_args)
    base = allocators[0][0]
    runs = read_tsv(runs_path)
    workloads = read_tsv(workloads_path)
    cpu = collections.defaultdict(list)
    rss = collections.defaultdict(list)
    failed = collections.Counter()
    differs = collections.Counter()
    by_round = {}  # (workload, allocator, round) -> cpu_us
    for run in runs:
        key = (run["workload"], run["allocator"])
        if run["status"] != "0":
            failed[key] += 1
            continue
        if run["same_output"] != "1":
            differs[key] += 1
        cpu[key].append(int(run["cpu_us"]))
        rss[key].append(int(run["maxrss_kb"]))
        by_round[(run["workload"], run["allocator"], run["round"])] = int(run["cpu_us"])

    def cell_note(key):
        notes = []
        if failed[key]:
            notes.append(f"{failed[key]} failed")
        if differs[key]:
            notes.append(f"{differs[key]} differ")
        return f" **({', '.join(notes)})**" if notes else ""

    def table(title, samples, fmt_base, unit_note):
        print(f"### {title}\n")
        print("| workload | " + " | ".join(label for _, label in allocators) + " |")
        print("|---|" + "---:|" * len(allocators))
        ratios = collections.defaultdict(dict)
        for workload in workloads:
            w = workload["workload"]
            base_values = samples.get((w, base))
            base_median = statistics.median(base_values) if base_values else None
            cells = []
            for name, _ in allocators:
                values = samples.get((w, name))
                note = cell_note((w, name))
                if not values:
                    cells.append(("failed" if failed[(w, name)] else "-") + note)
                    continue
                value = statistics.median(values)
                if name == base:
                    cells.append(fmt_base(value) + note)
                elif base_median:
                    ratios[name][w] = value / base_median
                    cells.append(f"{value / base_median:.3f}{note}")
                else:
                    cells.append("-" + note)
            print(f"| {w} | " + " | ".join(cells) + " |")
        means = []
        for name, _ in allocators:
            means.append("" if name == base else fmt_mean_of(ratios[name], len(workloads)))
        print("| **geometric mean** | " + " | ".join(f"**{m}**" if m else "" for m in means) + " |\n")
        print(unit_note + "\n")
        return ratios

    time_ratios = table(
        "CPU time (user+sys): glibc's median, the others' median as a ratio to it (lower is better)",
        cpu, lambda us: f"{us / 1e6:.3f} s",
        "Each cell is the median of the timed runs; a ratio below 1 is faster than glibc.")
    paired = collections.defaultdict(list)
    for (w, name, rnd), us in by_round.items():
        base_us = by_round.get((w, base, rnd))
        if name != base and base_us:
            paired[(w, name)].append(us / base_us)
    paired_table("CPU time, paired: the median over the rounds of each round's ratio to glibc's run in the same round",
                 [workload["workload"] for workload in workloads],
                 [(name, label) for name, label in allocators if name != base],
                 lambda w, name: paired.get((w, name)))
    rss_ratios = table(
        "Peak RSS: glibc's median, the others' median as a ratio to it (lower is better)",
        rss, lambda kb: f"{kb / 1024:.1f} MiB",
        "Peak resident set size of the process (with its children, for g++), from wait4.")

    print("### Workloads, and how much of them hotpool auto served from its pools\n")
    print("| workload | program and input | allocations per run | served from pools (hotpool auto) |")
    print("|---|---|---:|---:|")
    for workload in workloads:
        allocations = int(workload["allocations"] or 0)
        hits = int(workload["pool_hits"] or 0)
        share = f"{100.0 * hits / allocations:.1f}%" if allocations else "-"
        if workload["note"]:
            share += f" ({workload['note']})"
        print(f"| {workload['workload']} | {workload['description']} | {allocations:,} | {share} |")
    print()

    write_plot(plot_script, plot_output, allocators, workloads, time_ratios, rss_ratios)


def write_plot(script_path, output_path, allocators, workloads, time_ratios, rss_ratios):
    """A gnuplot script (data inline) drawing two bar charts: CPU time and
    peak RSS ratios to glibc, per workload and allocator."""
    base = allocators[0][0]
    others = [(name, label) for name, label in allocators[1:]]
    names = [w["workload"] for w in workloads] + ["geomean"]
    lines = [
        "# Written by bench/tools/tables.py (scripts/bench --suite alloc).",
        f'set terminal svg size 1000,760 dynamic font "sans,12" background "white"',
        f'set output "{output_path}"',
        "set termoption noenhanced",
        "set style data histograms",
        "set style histogram clustered gap 1",
        "set style fill solid 0.85 border -1",
        "set boxwidth 0.9",
        "set grid ytics",
        "set key outside right top vertical",
        "set xtics nomirror",
        "set yrange [0:*]",
        "set multiplot layout 2,1",
    ]
    for block, title, ratios in (("time", "CPU time, ratio to glibc (lower is better)", time_ratios),
                                 ("rss", "peak RSS, ratio to glibc (lower is better)", rss_ratios)):
        lines.append(f"${block} << EOD")
        for w in names:
            if w == "geomean":
                values = [geomean(list(ratios[name].values())) for name, _ in others]
            else:
                values = [ratios[name].get(w) for name, _ in others]
            lines.append(f'"{w}" ' + " ".join("NaN" if v is None else f"{v:.4f}" for v in values))
        lines.append("EOD")
        lines.append(f'set title "{title}"')
        plots = [f'${block} using {i + 2}:xtic(1) title "{label}"' for i, (_, label) in enumerate(others)]
        plots.append("1 with lines dashtype 2 linecolor rgb \"black\" notitle")
        lines.append("plot " + ", \\\n     ".join(plots))
    lines.append("unset multiplot")
    with open(script_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def pool_share(directory):
    """Sums totals.allocations and totals.pool_hits over the JSON reports in
    DIRECTORY (one per process of a run) and prints "allocations hits"."""
    allocations = hits = 0
    paths = sorted(glob.glob(os.path.join(directory, "*.json")))
    if not paths:
        sys.stderr.write(f"tables.py: no reports in {directory}\n")
        return 1
    for path in paths:
        with open(path) as f:
            totals = json.load(f)["totals"]
        allocations += int(totals["allocations"])
        hits += int(totals.get("pool_hits", 0))
    print(allocations, hits)
    return 0


# ---------------------------------------------------------------- profile

# heaptrack's first three lines: each is recognised by a piece of it.
HEAPTRACK_HEAD = ("heaptrack output will be written to ", "libheaptrack_preload.so",
                  "starting application, this might take some time...")
HEAPTRACK_TAIL = "Heaptrack finished! Now run the following to investigate the data:\n"


def heaptrack_stdout(in_path, out_path):
    """The program's stdout out of a heaptrack run's: heaptrack's script
    echoes three lines before starting the program (the output file, the
    preload library, "starting application...") and a few after it ends
    ("Heaptrack finished! ..."); the program's bytes in between are kept
    as they are, a missing final newline included."""
    with open(in_path, "rb") as f:
        data = f.read()
    rest = data
    for piece in HEAPTRACK_HEAD:
        line, newline, after = rest.partition(b"\n")
        if not newline or piece not in line.decode("utf-8", "replace"):
            sys.stderr.write(f"tables.py: {in_path}: not heaptrack's stdout (line {line[:80]!r})\n")
            return 1
        rest = after
    tail = rest.rfind(HEAPTRACK_TAIL.encode())
    if tail < 0:
        sys.stderr.write(f"tables.py: {in_path}: no '{HEAPTRACK_TAIL.strip()}' line\n")
        return 1
    with open(out_path, "wb") as f:
        f.write(rest[:tail])
    return 0


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            if key:
                meta[key] = value
    return meta


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def grep_number(path, pattern):
    """The first number matching PATTERN (a regex with one group) in the file, or None."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(pattern, text, re.MULTILINE)
    return int(match.group(1)) if match else None


def fmt_int(value):
    return "-" if value is None else f"{value:,}"


def fmt_diff(ours, theirs):
    """Relative difference of OURS to THEIRS, in percent, signed."""
    if ours is None or not theirs:
        return None
    return 100.0 * (ours - theirs) / theirs


def fmt_percent(value):
    if value is None:
        return "-"
    text = f"{value:+.3f}%" if abs(value) < 0.1 else f"{value:+.2f}%"
    return text.replace("-", "−")


def profile(runs_path, counts_path, meta_path, micro_dir, config_args):
    configs = parse_allocators(config_args)
    base = configs[0][0]
    meta = read_meta(meta_path)
    runs = read_tsv(runs_path)
    workloads = []
    for run in runs:
        if run["workload"] not in workloads:
            workloads.append(run["workload"])
    by_round = collections.defaultdict(dict)  # (workload, round) -> config -> run
    failed = collections.Counter()
    differs = collections.Counter()
    for run in runs:
        key = (run["workload"], run["config"])
        if run["status"] != "0":
            failed[key] += 1
            continue
        if run["same_output"] != "1":
            differs[key] += 1
        by_round[(run["workload"], run["round"])][run["config"]] = run

    def samples(field, workload, config):
        return [int(r[config][field]) for (w, _), r in by_round.items() if w == workload and config in r]

    def round_ratios(field, workload, config):
        return [int(r[config][field]) / int(r[base][field])
                for (w, _), r in by_round.items() if w == workload and config in r and base in r
                and int(r[base][field]) > 0]

    def note(key):
        notes = []
        if failed[key]:
            notes.append(f"{failed[key]} failed")
        if differs[key]:
            notes.append(f"{differs[key]} differ")
        return f" **({', '.join(notes)})**" if notes else ""

    def table(title, field, fmt_value, footnote):
        print(f"### {title}\n")
        print("| workload | " + " | ".join(label for _, label in configs) + " |")
        print("|---|" + "---:|" * len(configs))
        ratios = collections.defaultdict(dict)
        for w in workloads:
            base_values = samples(field, w, base)
            base_median = statistics.median(base_values) if base_values else None
            cells = []
            for name, _ in configs:
                values = samples(field, w, name)
                if not values:
                    cells.append(("failed" if failed[(w, name)] else "-") + note((w, name)))
                    continue
                value = statistics.median(values)
                if name == base:
                    cells.append(fmt_value(value) + note((w, name)))
                elif base_median:
                    ratio = value / base_median
                    ratios[name][w] = ratio
                    spread = round_ratios(field, w, name)
                    spread_text = f"; {min(spread):.2f}–{max(spread):.2f}" if len(spread) > 1 else ""
                    cells.append(f"**{ratio:.3f}** ({fmt_value(value)}{spread_text}){note((w, name))}")
                else:
                    cells.append("-" + note((w, name)))
            print(f"| {w} | " + " | ".join(cells) + " |")
        means = []
        for name, _ in configs:
            if name == base:
                means.append("")
                continue
            value = geomean(list(ratios[name].values()))
            text = "-" if value is None else f"**{value:.3f}**"
            if value is not None and len(ratios[name]) < len(workloads):
                text += f" (of {len(ratios[name])})"
            means.append(text)
        print("| geometric mean | " + " | ".join(means) + " |")
        return ratios, footnote

    cpu_ratios, cpu_note = table(
        "CPU time (user+sys): median; the others as a ratio to no preload (lower is better)",
        "cpu_us", lambda us: f"{us / 1e6:.3f} s",
        "Cells: the ratio of medians, then (the median; the lowest and highest of the per-round ratios).")
    targets = []
    for name, _ in configs:
        target = meta.get(f"target.{name}")
        if name == base or target is None:
            targets.append("")
            continue
        try:
            limit = float(target)
        except ValueError:
            targets.append(f"measured before: {target}")
            continue
        met = [w for w, r in cpu_ratios[name].items() if r <= limit]
        mean = geomean(list(cpu_ratios[name].values()))
        verdict = "met" if mean is not None and len(met) == len(workloads) else "not met"
        targets.append(f"≤ {target}: **{verdict}** ({len(met)} of {len(workloads)} workloads)")
    print("| target | " + " | ".join(targets) + " |\n")
    print(cpu_note + "\n")

    paired_table("CPU time, paired: the median over the rounds of each round's ratio to no preload", workloads,
                 [(name, label) for name, label in configs if name != base],
                 lambda w, name: round_ratios("cpu_us", w, name))

    _, wall_note = table(
        "Wall time: median; the others as a ratio to no preload (lower is better)",
        "wall_us", lambda us: f"{us / 1e6:.3f} s",
        "Wall time moves with the machine's other load (it is shared): trust the CPU times. heaptrack's "
        "interpreter and compressor run beside the program, on the other core when it is free, so its "
        "wall-time ratio can be lower than its CPU-time ratio.")
    print()
    print(wall_note + "\n")

    _, rss_note = table(
        "Peak RSS: median; the others as a ratio to no preload (lower is better)",
        "maxrss_kb", lambda kb: f"{kb / 1024:.1f} MiB",
        "Peak RSS is that of the largest single process of the run (wait4): for heaptrack, the program or heaptrack_interpret.")
    print()
    print(rss_note + "\n")

    profile_instructions(workloads, meta)
    profile_counts(counts_path, meta)
    profile_cost(meta, micro_dir)


def profile_instructions(workloads, meta):
    rows = []
    for w in workloads:
        none, default = meta.get(f"callgrind_workload.{w}.none"), meta.get(f"callgrind_workload.{w}.default")
        if none and default:
            rows.append((w, int(none), int(default), meta.get(f"callgrind_workload.{w}.describe", "")))
    if not rows:
        return
    print("### Instructions (callgrind): hotpool profile at default sampling, as a ratio to no preload\n")
    print("Each workload at its `--quick` size, once: instruction counts are deterministic, so this is the "
          "CPU-time table's first ratio without the machine's noise (not its value: instructions are not "
          "equally costly, and the JSON exit report is a larger share of a shorter run).\n")
    print(f"| workload | input | no preload | hotpool profile, default sampling (1 in {meta.get('default_sample', '?')}) |")
    print("|---|---|---:|---:|")
    ratios = []
    for w, none, default, describe in rows:
        ratios.append(default / none)
        print(f"| {w} | {describe} | {fmt_int(none)} | **{default / none:.3f}** ({fmt_int(default)}) |")
    mean = geomean(ratios)
    print(f"| geometric mean | | | **{mean:.3f}** |\n")


def profile_counts(counts_path, meta):
    limit = float(meta.get("count_target_percent", "1"))
    print("### Counts: hotpool (HOTPOOL_SAMPLE=1) vs heaptrack, from the last round\n")
    print(f"Difference: (hotpool − heaptrack) / heaptrack; target: within {limit:g}%. "
          "hotpool: `totals.allocations` (exact) and the sum of `class_lifetimes[].temporary` "
          "(every allocation sampled) of its JSON report; at default sampling, that sum scaled by "
          "`totals.frees` / sum of `sampled_frees`. heaptrack: its `heaptrack stats` "
          "(heaptrack_interpret, stderr of the run: a free is temporary when it frees the block of the "
          "directly preceding allocation) and heaptrack_print's summary lines (`calls to allocation "
          "functions`, `temporary memory allocations`: there a free is temporary when the preceding "
          "allocation had the same size and stack, not necessarily the same block). "
          "heaptrack orders the events of all threads in one stream, hotpool counts per thread: "
          "temporaries compare only for single-threaded programs.\n")
    print(f"| workload | measure | hotpool | heaptrack | difference | within {limit:g}% |")
    print("|---|---|---:|---:|---:|:---:|")
    for row in read_tsv(counts_path):
        w = row["workload"]
        every = load_json(row["hotpool_report"])
        default = load_json(row["default_report"])
        ht_allocations = grep_number(row["heaptrack_stderr"], r"^\s*allocations:\s*(\d+)")
        ht_temporary = grep_number(row["heaptrack_stderr"], r"^\s*temporary allocations:\s*(\d+)")
        print_allocations = grep_number(row["heaptrack_print"], r"^calls to allocation functions:\s*(\d+)")
        print_temporary = grep_number(row["heaptrack_print"], r"^temporary memory allocations:\s*(\d+)")
        threads = hp_allocations = hp_temporary = None
        if every:
            totals = every["totals"]
            threads = totals.get("threads_seen")
            hp_allocations = int(totals["allocations"])
            hp_temporary = sum(int(c.get("temporary", 0)) for c in every.get("class_lifetimes", []))
        estimate = estimate_note = margin = None
        if default:
            lifetimes = default.get("class_lifetimes", [])
            sampled_frees = sum(int(c.get("sampled_frees", 0)) for c in lifetimes)
            sampled_temporary = sum(int(c.get("temporary", 0)) for c in lifetimes)
            frees = int(default["totals"]["frees"])
            if sampled_frees:
                estimate = round(sampled_temporary * frees / sampled_frees)
                share = sampled_temporary / sampled_frees
                # 95% interval of a binomial share, relative to the estimate.
                margin = 196.0 * math.sqrt(share * (1 - share) / sampled_frees) / share if share else None
                estimate_note = f"{sampled_temporary:,} of {sampled_frees:,} sampled frees" + (
                    f", ±{margin:.1f}% at 95%" if margin is not None else "")
        label = w + (f" ({threads} thread{'s' if threads != 1 else ''})" if threads is not None else "")
        comparable = threads == 1

        def line(first, measure, ours, ours_note, theirs, theirs_note, judge=True, within=None):
            diff = fmt_diff(ours, theirs)
            if diff is None:
                verdict = ""
            elif not judge:
                verdict = "(not comparable)"
            elif within is not None:
                verdict = f"{'within' if abs(diff) <= within else '**outside**'} ±{within:.1f}% (sampling)"
            else:
                verdict = "yes" if abs(diff) <= limit else "**no**"
            ours_text = fmt_int(ours) + (f" ({ours_note})" if ours_note and ours is not None else "")
            theirs_text = fmt_int(theirs) + (f" ({theirs_note})" if theirs_note and theirs is not None else "")
            print(f"| {first} | {measure} | {ours_text} | {theirs_text} | {fmt_percent(diff)} | {verdict} |")

        if every is None:
            print(f"| {w} | | no report (the run failed?) | | | |")
        line(label, "allocating calls", hp_allocations, "", ht_allocations, "heaptrack stats")
        if print_allocations is not None and print_allocations != ht_allocations:
            line("", "allocating calls", hp_allocations, "", print_allocations, "heaptrack_print")
        line("", "temporary allocations", hp_temporary, "", ht_temporary, "heaptrack stats: same block", comparable)
        line("", "temporary allocations, heaptrack_print's count", hp_temporary, "", print_temporary,
             "heaptrack_print: same size and stack", comparable)
        if estimate is not None:
            line("", f"temporary, hotpool at default sampling (1 in {meta.get('default_sample', '?')}), estimated",
                 estimate, estimate_note, ht_temporary, "heaptrack stats", comparable, margin)
    print()


def profile_cost(meta, micro_dir):
    print("### The cost of one sampled allocation\n")
    print("| measure | no preload | hotpool profile, HOTPOOL_SAMPLE=0 | hotpool profile, HOTPOOL_SAMPLE=1 | "
          "per sampled allocation (SAMPLE=1 − SAMPLE=0) |")
    print("|---|---:|---:|---:|---:|")
    # Micro: CPU ns per pair, median over the rounds.
    ns = {}
    for config in ("micro-none", "micro-sample0", "micro-sample1"):
        values = []
        for path in sorted(glob.glob(os.path.join(micro_dir, f"{config}-*.json"))):
            data = load_json(path)
            for run in (data or {}).get("benchmarks", []):
                if run.get("run_type", "iteration") != "iteration" or run.get("error_occurred"):
                    continue
                pairs = float(run.get("pairs_per_iteration", 1.0))
                values.append(run["cpu_time"] * TIME_UNIT_NS[run.get("time_unit", "ns")] / pairs)
        ns[config] = statistics.median(values) if values else None
    notes = []
    if "micro_note" in meta:
        notes.append(f"hotpool-micro: {meta['micro_note']}.")
    if ns.get("micro-sample1") is not None:
        cost = (ns["micro-sample1"] - ns["micro-sample0"]) if ns.get("micro-sample0") is not None else None
        print(f"| hotpool-micro `pair/64` B, 1 thread: CPU ns per malloc+free pair, median of "
              f"{meta.get('micro_rounds', '?')} round(s) | {fmt_ns(ns.get('micro-none'))} | "
              f"{fmt_ns(ns.get('micro-sample0'))} | {fmt_ns(ns['micro-sample1'])} | "
              f"**{fmt_ns(cost)} ns** |")
    # Callgrind: instructions.
    if "callgrind_sample1" in meta:
        none, sample0, sample1, reported = (int(meta[f"callgrind_{k}"]) for k in ("none", "sample0", "sample1", "reported"))
        if meta.get("callgrind_sample1_again"):
            again = int(meta["callgrind_sample1_again"])
            if abs(again - sample1) > 0.02 * min(again, sample1):
                notes.append(f"callgrind: the two HOTPOOL_SAMPLE=1 runs (exit report off) counted "
                             f"{fmt_int(sample1)} and {fmt_int(again)} instructions; the table uses the lower.")
            sample1 = min(sample1, again)
        report = load_json(meta.get("callgrind_report", ""))
        allocations = int(report["totals"]["allocations"]) if report else None
        sites = len(report.get("sites", [])) if report else None
        per_unsampled = (f" (+{(sample0 - none) / allocations:,.0f} per allocation, start-up included)"
                         if allocations else "")
        per_sampled = f"**{(sample1 - sample0) / allocations:,.0f} instructions**" if allocations else "-"
        print(f"| clang-format on {meta.get('callgrind_kib', '?')} KiB ({fmt_int(allocations)} allocations): "
              f"instructions (callgrind), exit report off | {fmt_int(none)} | {fmt_int(sample0)}{per_unsampled} | "
              f"{fmt_int(sample1)} | {per_sampled} |")
        report_cost = reported - sample1
        per_site = f", {report_cost / sites:,.0f} per site" if sites else ""
        print(f"| the same, HOTPOOL_SAMPLE=1 with its JSON exit report ({fmt_int(sites)} sites) | | | "
              f"{fmt_int(reported)} | the report: {fmt_int(report_cost)} instructions{per_site} |")
    elif "callgrind_note" in meta:
        notes.append(f"callgrind: {meta['callgrind_note']}.")
    print()
    print("A sampled allocation captures its stack (HOTPOOL_UNWINDER: libgcc's unwinder by default, "
          "up to HOTPOOL_DEPTH frames; a capture stops where it rejoins the thread's previous stack) "
          "at the allocation; its free tells whether the allocating frame is still active from that "
          "frame's return-address slot, and captures the stack again only where that is unknown. "
          "The micro pair runs in a shallow stack (Google Benchmark's loop); clang-format's stacks "
          "are deeper. The exit report symbolizes the frames of every reported site.")
    if notes:
        print()
        print(" ".join(notes))
    print()


def main(argv):
    if len(argv) >= 3 and argv[1] == "micro":
        micro(argv[2], argv[3:])
    elif len(argv) >= 6 and argv[1] == "alloc":
        alloc(argv[2], argv[3], argv[4], argv[5], argv[6:])
    elif len(argv) == 3 and argv[1] == "pool-share":
        return pool_share(argv[2])
    elif len(argv) >= 6 and argv[1] == "profile":
        profile(argv[2], argv[3], argv[4], argv[5], argv[6:])
    elif len(argv) == 4 and argv[1] == "heaptrack-stdout":
        return heaptrack_stdout(argv[2], argv[3])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
