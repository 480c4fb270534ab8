#!/usr/bin/env python3
"""scripts/hotpool-convert on the report of a program with known sites
(sites_program, every allocation sampled): the collapsed stacks and the
pprof profile must carry the report's sites, frames and values exactly.
The pprof output is decoded with the protobuf library (protoc and
python3-protobuf, which scripts/test installs) through pprof_subset.proto.

  convert_test.py --library L --program P --converter C --proto F --workdir D
"""
import argparse
import gzip
import importlib
import json
import os
import subprocess
import sys

COUNT = 300
failures = []


def check(condition, what):
    if not condition:
        failures.append(what)
        print("FAILED: " + what)


def run_report(args, sample="1", sample_bytes="0", scenario="patterns"):
    report = os.path.join(args.workdir, "run-%s-%s-%s.json" % (scenario, sample, sample_bytes))
    if os.path.exists(report):
        os.remove(report)
    env = dict(os.environ, LD_PRELOAD=args.library, HOTPOOL_MODE="profile", HOTPOOL_SAMPLE=sample,
               HOTPOOL_SAMPLE_BYTES=sample_bytes, HOTPOOL_OUTPUT=report)
    subprocess.run([args.program, scenario, str(COUNT)], env=env, check=True, stdout=subprocess.DEVNULL)
    with open(report) as file:
        return report, json.load(file)


def convert(args, report, *options):
    return subprocess.run([sys.executable, args.converter, *options, report], check=True, capture_output=True,
                          text=True).stdout


def collapsed_lines(text):
    lines = []
    for line in text.splitlines():
        stack, _, value = line.rpartition(" ")
        lines.append((stack.split(";"), int(value)))
    return lines


def leaf_function(frames):
    return frames[-1].split(" (")[0]


def test_collapsed(args, path, report):
    sites = [site for site in report["sites"] if site["frames"]]
    lines = collapsed_lines(convert(args, path))
    check(len(lines) == len(sites), "collapsed: one line per site (%d lines, %d sites)" % (len(lines), len(sites)))
    check(sum(value for _, value in lines) == sum(site["estimated_allocations"] for site in sites),
          "collapsed: the allocations add up to the sites'")
    # Outermost first: main before the pattern function, which is the leaf.
    frame_local = [(stack, value) for stack, value in lines if "frame_local_site" in stack[-1]]
    check(len(frame_local) == 2, "collapsed: frame_local_site's two sites (100 B and 8 B), got %d" % len(frame_local))
    for stack, value in frame_local:
        check(any(frame == "main" for frame in stack[:-1]), "collapsed: main is an outer frame of " + stack[-1])
        check(value == COUNT, "collapsed: %d allocations at a frame_local_site site, got %d" % (COUNT, value))
    # --lines tells the two sites of frame_local_site apart by line.
    with_lines = collapsed_lines(convert(args, path, "--lines"))
    leaves = {stack[-1] for stack, _ in with_lines if "frame_local_site" in stack[-1]}
    check(len(leaves) == 2 and all(":" in leaf and leaf.endswith(")") for leaf in leaves),
          "collapsed --lines: two leaves with file:line, got %s" % sorted(leaves))
    # Other values: bytes and live-at-exit, as the report has them (rate 1).
    bytes_lines = collapsed_lines(convert(args, path, "--value", "bytes"))
    check(sum(value for _, value in bytes_lines) == sum(site["sampled_bytes"] for site in sites),
          "collapsed --value bytes: the bytes add up to the sites'")
    leaks = [(stack, value) for stack, value in collapsed_lines(convert(args, path, "--value", "live-at-exit"))
             if "leak_site" in leaf_function(stack)]
    check(len(leaks) == 1 and leaks[0][1] == COUNT, "collapsed --value live-at-exit: %d leaked at leak_site, got %s"
          % (COUNT, [value for _, value in leaks]))


def test_pprof(args, path, report):
    subprocess.run(["protoc", "--proto_path=" + os.path.dirname(args.proto), "--python_out=" + args.workdir,
                    args.proto], check=True)
    sys.path.insert(0, args.workdir)
    module = importlib.import_module(os.path.splitext(os.path.basename(args.proto))[0] + "_pb2")
    output = os.path.join(args.workdir, "run-1.pb.gz")
    convert(args, path, "--format", "pprof", "--output", output)
    with open(output, "rb") as file:
        profile = module.Profile.FromString(gzip.decompress(file.read()))
    strings = list(profile.string_table)
    check(strings and strings[0] == "", "pprof: string_table[0] is empty")
    types = [(strings[t.type], strings[t.unit]) for t in profile.sample_type]
    check(types[:2] == [("allocations", "count"), ("space", "bytes")], "pprof: allocations, then bytes: %s" % types)
    check(("live_at_exit", "count") in types, "pprof: live_at_exit is a sample type")
    check(profile.period == 1, "pprof: the period is the sampling rate (1)")
    check(strings[profile.default_sample_type] == "allocations", "pprof: allocations is the default sample type")
    ranges = sorted((mapping.memory_start, mapping.memory_limit) for mapping in profile.mapping)
    check(all(mapping.id and mapping.memory_start < mapping.memory_limit for mapping in profile.mapping)
          and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "pprof: mappings have ids and lie apart")
    sites = [site for site in report["sites"] if site["frames"]]
    check(len(profile.sample) == len(sites), "pprof: one sample per site")
    locations = {location.id: location for location in profile.location}
    functions = {function.id: function for function in profile.function}
    mappings = {mapping.id: mapping for mapping in profile.mapping}
    keys = {"allocations": "estimated_allocations", "space": "sampled_bytes", "live_at_exit": "live_at_exit",
            "short_lived": "short_lived", "frame_local": "frame_local"}
    for sample, site in zip(profile.sample, sites):
        addresses = return_addresses(site["frames"])
        check(len(sample.location_id) == len(addresses), "pprof: a location per return address of site %d" % site["id"])
        for location_id, address in zip(sample.location_id, addresses):  # the leaf first in both
            location = locations.get(location_id)
            if location is None or len(location.line) != len(address) or location.mapping_id not in mappings:
                check(False, "pprof: location %d resolves, a line per frame" % location_id)
                continue
            mapping = mappings[location.mapping_id]
            check(location.id and mapping.memory_start <= location.address < mapping.memory_limit,
                  "pprof: location %d has an id and lies in its mapping" % location_id)
            for line, frame in zip(location.line, address):  # the inlined frames first, the address's own last
                function = functions[line.function_id]
                if frame["function"] != "??":
                    check(strings[function.name] == frame["short_function"], "pprof: function %s" % frame["function"])
                    check(strings[function.system_name] == frame["function"],
                          "pprof: system name %s" % frame["function"])
                check(line.line == frame["line"], "pprof: line of %s" % frame["function"])
            check(strings[mappings[location.mapping_id].filename] == address[-1]["module"], "pprof: module of a frame")
        for index, (kind, _) in enumerate(types):
            if kind in keys:
                check(sample.value[index] == site[keys[kind]], "pprof: %s of site %d" % (kind, site["id"]))
        labels = {strings[label.key]: label for label in sample.label}
        check(labels.get("min_size") is not None and labels["min_size"].num == site["min_size"],
              "pprof: min_size label of site %d" % site["id"])
    leaf_lines = [locations[sample.location_id[0]].line[0] for sample in profile.sample]
    named = [strings[functions[line.function_id].name] for line in leaf_lines]
    check(any("frame_local_site" in name for name in named), "pprof: a sample's leaf is frame_local_site")


def return_addresses(frames):
    """The report's frames grouped by return address: the frames inlined
    there (marked), then the address's own."""
    groups, group = [], []
    for frame in frames:
        group.append(frame)
        if not frame.get("inlined"):
            groups.append(group)
            group = []
    return groups + ([group] if group else [])


def test_inlined(args):
    # sites_program's allocation in inlined_allocate, inlined into
    # inlined_middle, inlined into inlining_caller: one return address.
    path, report = run_report(args, scenario="inlined")
    chain = ["inlining_caller", "inlined_middle", "inlined_allocate"]
    stacks = [stack for stack, _ in collapsed_lines(convert(args, path))
              if stack and stack[-1].startswith("inlined_allocate")]
    check(len(stacks) == 1 and all(name in frame for name, frame in zip(chain, stacks[0][-3:]))
          and any(frame == "main" for frame in stacks[0][:-3]),
          "collapsed: main, then %s, got %s" % (";".join(chain), stacks))
    output = os.path.join(args.workdir, "inlined.pb.gz")
    convert(args, path, "--format", "pprof", "--output", output)
    module = importlib.import_module(os.path.splitext(os.path.basename(args.proto))[0] + "_pb2")
    with open(output, "rb") as file:
        profile = module.Profile.FromString(gzip.decompress(file.read()))
    strings = list(profile.string_table)
    locations = {location.id: location for location in profile.location}
    functions = {function.id: function for function in profile.function}
    leaves = [locations[sample.location_id[0]] for sample in profile.sample if sample.location_id]
    named = [[strings[functions[line.function_id].name] for line in leaf.line] for leaf in leaves]
    check(any(len(lines) == 3 and all(name in line for name, line in zip(reversed(chain), lines)) for lines in named),
          "pprof: a location with lines %s, got %s" % (list(reversed(chain)), named))


def test_names(args):
    # sites_program's vector grown by push_back: by default functions are
    # named as the text report names them, --full-names keeps the report's
    # full names; pprof's function has both.
    path, report = run_report(args, scenario="library_path")
    site = next((site for site in report["sites"]
                 if any("grow_vector" in frame["function"] for frame in site["frames"])), None)
    check(site is not None, "names: the report has grow_vector's site")
    if site is None:
        return
    full = [frame["function"] for frame in site["frames"]]
    short = [frame["short_function"] for frame in site["frames"]]
    check(any("<int" in name for name in full) and not any("<int" in name for name in short),
          "names: template arguments in the full names only: %s / %s" % (full, short))
    check(any(name.endswith("push_back") for name in short), "names: a short push_back among %s" % short)
    check("(anonymous namespace)::grow_vector" in short, "names: grow_vector's short name among %s" % short)
    for options, names in (((), short), (("--full-names",), full)):
        stacks = [stack for stack, _ in collapsed_lines(convert(args, path, *options))
                  if any("grow_vector" in frame for frame in stack)]
        # Outermost first; a frame without a name is its module and offset.
        expected = [name.replace(";", ":") for name in reversed(names)]
        check(len(stacks) == 1 and len(stacks[0]) == len(expected)
              and all(got == want or want == "??" for got, want in zip(stacks[0], expected)),
              "collapsed %s: the site's stack %s, got %s" % (" ".join(options), expected, stacks))


def test_scaled(args):
    # One allocation in 7 sampled: counts kept per sample are scaled by the
    # rate; the allocations are the report's own estimates.
    path, report = run_report(args, "7")
    check(report["sampling"]["rate"] == 7, "the second report samples one allocation in 7")
    sites = [site for site in report["sites"] if site["frames"]]
    lines = collapsed_lines(convert(args, path, "--value", "bytes"))
    check(sum(value for _, value in lines) == 7 * sum(site["sampled_bytes"] for site in sites),
          "collapsed --value bytes at rate 7: the sampled bytes times 7")
    lines = collapsed_lines(convert(args, path))
    check(sum(value for _, value in lines) == sum(site["estimated_allocations"] for site in sites),
          "collapsed at rate 7: the report's estimated allocations")


def test_by_bytes(args):
    # Sampled by bytes: allocations and bytes are the report's estimates,
    # the other counts scaled as the site's allocations.
    path, report = run_report(args, "1", "256")
    check(report["sampling"]["by"] == "bytes" and report["sampling"]["mean_bytes"] == 256,
          "the third report samples one per 256 bytes")
    sites = [site for site in report["sites"] if site["frames"]]
    lines = collapsed_lines(convert(args, path, "--value", "bytes"))
    check(sum(value for _, value in lines) == sum(site["estimated_bytes"] for site in sites),
          "collapsed --value bytes by bytes: the report's estimated bytes")
    lines = collapsed_lines(convert(args, path))
    check(sum(value for _, value in lines) == sum(site["estimated_allocations"] for site in sites),
          "collapsed by bytes: the report's estimated allocations")
    site = {"id": 1, "estimated_allocations": 10, "sampled_allocations": 4, "sampled_bytes": 64, "estimated_bytes": 160,
            "short_lived": 2, "frames": [{"function": "f", "file": "", "line": 0, "module": "m", "offset": 1}]}
    by_hand = os.path.join(args.workdir, "by-bytes.json")
    with open(by_hand, "w") as file:
        json.dump({"schema": "hotpool-report", "version": 2, "sampling": {"rate": 0, "by": "bytes", "mean_bytes": 64},
                   "sites": [site]}, file)
    check(convert(args, by_hand, "--value", "short-lived") == "f 5\n", "by bytes: 2 of 4 samples of 10 allocations")
    check(convert(args, by_hand, "--value", "bytes") == "f 160\n", "by bytes: the estimated bytes")
    out = os.path.join(args.workdir, "by-bytes.pb.gz")
    convert(args, by_hand, "--format", "pprof", "--output", out)
    check(os.path.getsize(out) > 0, "pprof by bytes")


def test_inputs(args):
    # A frame without a function name, written by hand; then reports the
    # converter must refuse in one line.
    frame = {"function": "??", "file": "", "line": 0, "module": "libx.so", "offset": 0x1234}
    main = {"function": "main", "file": "m.c", "line": 3, "module": "prog", "offset": 16}
    site = {"id": 1, "estimated_allocations": 8, "sampled_allocations": 2, "sampled_bytes": 10, "live_at_exit": 1,
            "frames": [frame, main]}
    report = {"schema": "hotpool-report", "version": 1, "sampling": {"rate": 4}, "sites": [site]}
    cases = {"by-hand": report, "no-sampling": dict(report, sampling=None), "version-3": dict(report, version=3),
             "not-a-report": {"sites": []}}
    paths = {}
    for name, content in cases.items():
        paths[name] = os.path.join(args.workdir, name + ".json")
        with open(paths[name], "w") as file:
            json.dump(content, file)
    check(convert(args, paths["by-hand"]) == "main;libx.so+0x1234 8\n", "collapsed: a nameless frame is module+0xoffset")
    check(convert(args, paths["by-hand"], "--value", "bytes") == "main;libx.so+0x1234 40\n",
          "collapsed: sampled bytes times the rate")
    check(convert(args, paths["by-hand"], "--lines") == "main (m.c:3);libx.so+0x1234 8\n", "collapsed --lines")
    for name in ("no-sampling", "version-3", "not-a-report"):
        run = subprocess.run([sys.executable, args.converter, paths[name]], capture_output=True, text=True)
        check(run.returncode != 0 and run.stderr.startswith("hotpool-convert: ") and run.stderr.count("\n") == 1,
              "%s: one hotpool-convert: line and a failure status, got %r" % (name, run.stderr))


def main():
    parser = argparse.ArgumentParser()
    for option in ("--library", "--program", "--converter", "--proto", "--workdir"):
        parser.add_argument(option, required=True)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    path, report = run_report(args)
    check(report["sampling"]["rate"] == 1, "the report samples every allocation")
    test_collapsed(args, path, report)
    test_pprof(args, path, report)
    test_inlined(args)
    test_names(args)
    test_scaled(args)
    test_by_bytes(args)
    test_inputs(args)
    bad = subprocess.run([sys.executable, args.converter, args.converter], capture_output=True, text=True)
    check(bad.returncode != 0 and bad.stderr.startswith("hotpool-convert: "),
          "a file that is not JSON: one hotpool-convert: line, a failure status")
    if failures:
        sys.exit("%d check(s) failed" % len(failures))
    print("all checks passed")


if __name__ == "__main__":
    main()
