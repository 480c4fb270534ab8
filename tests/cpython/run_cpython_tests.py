#!/usr/bin/env python3
"""CPython's regression suite with and without hotpool, compared test by test.

Each test module runs in its own `python3 -m test` process, once without
hotpool (the baseline) and once under LD_PRELOAD=libhotpool.so in every mode
asked for, with PYTHONMALLOC=malloc so that every object goes through
malloc. Per-test outcomes come from regrtest's --junit-xml file. A test that
fails only under hotpool, a test that vanished under hotpool, or a module that
crashed or timed out only under hotpool is a failure of ours; failures that
happen without hotpool too are listed as "also without hotpool" and ignored.

A module that differs is run once more under hotpool (--reruns): if it then
agrees with the baseline it is reported as flaky and not counted as failed.

The last line is exactly `N passed, M failed`, counting (module, mode) pairs:
passed = same results as the baseline, failed = ours. Exit status: 0 when
M == 0, 1 when M > 0, 2 when the harness itself could not run.

  run_cpython_tests.py --library build/libhotpool.so --mode auto test_json test_re
  run_cpython_tests.py --library build/libhotpool.so --modes auto,profile --all -j2
"""

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

BASELINE = "baseline"
SUITE_PACKAGE = "libpython3.11-testsuite"

# Run instead of `python -m test`, with the same arguments. A test whose
# subtests failed gets neither addSuccess nor addFailure, so regrtest leaves
# its junit element without a name; name it here and record the failure.
REGRTEST_MAIN = r"""
try:
    from test.support import testresult as _testresult
    _Result = _testresult.RegressionTestResult
    _stop_test = _Result.stopTest
    def _stop_test_naming_subtest_failures(self, test):
        if getattr(self, '_RegressionTestResult__e', None) is not None:
            self._add_result(test, failure={'type': 'SubTestFailure',
                                            'message': 'one or more subtests failed'})
        _stop_test(self, test)
    _Result.stopTest = _stop_test_naming_subtest_failures
except Exception:
    pass
from test.libregrtest import main
main()
"""


def die(message):
    print(f"run_cpython_tests: {message}", file=sys.stderr)
    print("0 passed, 1 failed")
    sys.exit(2)


def check_suite(python):
    """The Debian test suite must be installed: a missing one is an error, not a skip."""
    probe = subprocess.run(
        [python, "-c", "import test.libregrtest, test.support, os, test; print(os.path.dirname(test.__file__))"],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["?"])[-1]
        die(f"{python} has no regression test suite ({reason}); install it: apt-get install {SUITE_PACKAGE}")
    return probe.stdout.strip()


def list_all_modules(python, testdir):
    command = [python, "-m", "test", "--list-tests"] + (["--testdir", testdir] if testdir else [])
    listed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if listed.returncode != 0:
        die(f"{python} -m test --list-tests failed: {listed.stderr.strip()}")
    return [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith("test_")]


# ---------------------------------------------------------------- one run

def base_environment():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("HOTPOOL_")}
    env["PYTHONMALLOC"] = "malloc"
    return env


def parse_junit(path):
    """{test id (#k for the k-th repeat of an id): 'pass' | 'fail' | 'skip'}, failure texts."""
    tests, messages, seen = {}, {}, {}
    root = ET.parse(path).getroot()
    for index, case in enumerate(root.iter("testcase")):
        name = case.get("name") or f"<unnamed test #{index}>"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            tests[name] = "fail"
            text = failure.get("message") or failure.text or ""
            messages[name] = text.strip().splitlines()[-1][:300] if text.strip() else failure.get("type", "")
        elif case.find("skipped") is not None:
            tests[name] = "skip"
        elif case.get("outcome") == "UNEXPECTED_SUCCESS" or case.find("outcome") is not None:
            tests[name] = "fail"
            messages[name] = "unexpected success"
        else:
            tests[name] = "pass"
    return tests, messages


def run_module(args, module, config, attempt, suite_dir):
    """Runs one module in one configuration; returns a result dict."""
    run_dir = os.path.join(args.work_dir, config, module + (f".rerun{attempt}" if attempt else ""))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "tmp"))
    reports = os.path.join(run_dir, "reports")
    env = base_environment()
    if args.testdir:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in a source tree
    if config != BASELINE:
        os.makedirs(reports)
        os.chmod(reports, 0o1777)  # children that switch to another user write there too
        env["LD_PRELOAD"] = args.library
        env["HOTPOOL_MODE"] = config
        env["HOTPOOL_OUTPUT"] = os.path.join(reports, "report.%p.txt")
    junit = os.path.join(run_dir, "junit.xml")
    log_path = os.path.join(run_dir, "output.txt")
    command = [args.python, "-c", REGRTEST_MAIN, "-v", "--junit-xml", junit,
               "--timeout", str(args.timeout), "--tempdir", os.path.join(run_dir, "tmp")]
    if args.use:
        command += ["-u", args.use]
    if args.testdir:
        command += ["--testdir", args.testdir]
    command.append(module)

    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=run_dir, start_new_session=True)
        try:
            exit_code = process.wait(timeout=args.timeout + 60)
            killed = False
        except subprocess.TimeoutExpired:
            killed = True
    # Whatever the module left behind in its session (servers, children) goes
    # too, and a module past its time is stopped.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if killed:
        exit_code = process.wait()
    duration = time.monotonic() - started

    with open(log_path, "rb") as log:
        output = log.read().decode("utf-8", "replace")
    result = {"module": module, "config": config, "exit_code": exit_code, "duration": round(duration, 1),
              "tests": {}, "messages": {}, "hotpool_lines": [], "reports": 0, "log": log_path,
              "command": command_line(args, module, config)}
    if killed or "Timeout (" in output and exit_code not in (0, 2):
        result["status"] = "timeout"
    elif exit_code < 0:
        result["status"] = f"crashed ({signal.Signals(-exit_code).name})" if -exit_code in signal.valid_signals() \
            else f"crashed (signal {-exit_code})"
    elif exit_code == 0:
        result["status"] = "skipped" if f"{module} skipped" in output else "ok"
    elif exit_code == 2:
        result["status"] = "failed"
    else:
        result["status"] = f"error (exit {exit_code})"
    if os.path.exists(junit):
        try:
            result["tests"], result["messages"] = parse_junit(junit)
        except ET.ParseError as error:
            result["status"] = f"bad junit ({error})"
    elif result["status"] in ("ok", "failed"):
        result["status"] = "no junit"
    lines = []
    for line in output.splitlines():
        if line.startswith("hotpool:") and line not in lines:
            lines.append(line)
    result["hotpool_lines"] = lines[:20]
    if config != BASELINE:
        result["reports"] = len(os.listdir(reports))
        if result["reports"] == 0 and result["status"] in ("ok", "failed", "skipped"):
            result["status"] = "hotpool not loaded (no report)"
    if not args.keep:
        shutil.rmtree(os.path.join(run_dir, "tmp"), ignore_errors=True)
        shutil.rmtree(reports, ignore_errors=True)
        if os.path.exists(junit):
            os.unlink(junit)
    return result


def command_line(args, module, config):
    env = "PYTHONMALLOC=malloc"
    if config != BASELINE:
        env += f" LD_PRELOAD={args.library} HOTPOOL_MODE={config} HOTPOOL_OUTPUT=/tmp/hotpool.%p.txt"
    use = f" -u {args.use}" if args.use else ""
    testdir = f" --testdir {args.testdir}" if args.testdir else ""
    return f"{env} {args.python} -m test -v{use}{testdir} {module}"


# ---------------------------------------------------------------- comparison

CRASHES = ("timeout", "crashed", "error", "no junit", "bad junit", "hotpool not loaded")


def is_crash(status):
    return status.startswith(CRASHES)


def compare(baseline, hotpool):
    """Returns (ours: [text], also_without: [text], notes: [text])."""
    ours, also, notes = [], [], []
    if hotpool["status"].startswith("hotpool not loaded"):
        ours.append("hotpool was not loaded: no report was written")
        return ours, also, notes
    if is_crash(hotpool["status"]):
        if is_crash(baseline["status"]):
            also.append(f"module {hotpool['status']} (without hotpool: {baseline['status']})")
        else:
            ours.append(f"module {hotpool['status']} only under hotpool")
        return ours, also, notes
    base_tests, hot_tests = baseline["tests"], hotpool["tests"]
    for name, outcome in hot_tests.items():
        if outcome != "fail":
            if outcome == "skip" and base_tests.get(name) == "pass":
                notes.append(f"{name}: skipped only under hotpool")
            continue
        message = hotpool["messages"].get(name, "")
        if base_tests.get(name) == "fail":
            also.append(f"{name}: {message}")
        elif is_crash(baseline["status"]) and name not in base_tests:
            also.append(f"{name}: {message} (baseline {baseline['status']} before this test)")
        else:
            ours.append(f"{name} failed only under hotpool: {message}")
    if not is_crash(baseline["status"]):
        missing = [name for name in base_tests if name not in hot_tests]
        for name in missing[:10]:
            ours.append(f"{name} ran without hotpool but not under it")
        if len(missing) > 10:
            ours.append(f"... and {len(missing) - 10} more tests missing under hotpool")
    if hotpool["status"] == "failed" and baseline["status"] in ("ok", "skipped") and not ours:
        ours.append("module failed only under hotpool (no single test to blame; see the log)")
    if is_crash(baseline["status"]):
        notes.append(f"without hotpool the module {baseline['status']}")
    return ours, also, notes


# ---------------------------------------------------------------- main

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="test modules (test_json ...)")
    parser.add_argument("--library", help="path to libhotpool.so (needed unless --baseline-only)")
    parser.add_argument("--mode", "--modes", dest="modes", default="auto",
                        help="comma-separated hotpool modes to compare with the baseline (default auto)")
    parser.add_argument("--python", default="/usr/bin/python3", help="interpreter (default /usr/bin/python3)")
    parser.add_argument("--modules-file", help="read more modules from this file, one a line ('#' comments)")
    parser.add_argument("--all", action="store_true", help="every module of `python3 -m test --list-tests`")
    parser.add_argument("--exclude", default="", help="comma-separated modules to leave out")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="modules run at once (default 1)")
    parser.add_argument("--timeout", type=int, default=600, help="per module and run, seconds (default 600)")
    parser.add_argument("--use", default="", help="regrtest -u resources (default: regrtest's own default)")
    parser.add_argument("--reruns", type=int, default=1,
                        help="run a module that differs again under hotpool this many times (default 1)")
    parser.add_argument("--testdir", help="run the modules of this directory instead of CPython's (self-test)")
    parser.add_argument("--work-dir", help="where logs and results go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep junit files, temp dirs and hotpool reports")
    parser.add_argument("--baseline-only", action="store_true",
                        help="only run the baseline and store it in --work-dir for later --reuse-baseline")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="use the baseline results already stored in --work-dir")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    for mode in args.modes:
        if mode not in ("off", "profile", "fixed", "auto"):
            parser.error(f"unknown mode {mode}")
    if not args.baseline_only:
        if not args.library:
            parser.error("--library is needed")
        args.library = os.path.abspath(args.library)
        if not os.path.isfile(args.library):
            die(f"no hotpool library at {args.library}")
    if (args.baseline_only or args.reuse_baseline) and not args.work_dir:
        parser.error("--baseline-only and --reuse-baseline need --work-dir")
    if not args.work_dir:
        args.work_dir = tempfile.mkdtemp(prefix="hotpool-cpython-")
    args.work_dir = os.path.abspath(args.work_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    return args


def main():
    args = parse_args()
    suite_dir = check_suite(args.python)
    if args.testdir:
        args.testdir = os.path.abspath(args.testdir)
        suite_dir = args.testdir
    available = list_all_modules(args.python, args.testdir)
    modules = list(args.modules)
    if args.modules_file:
        with open(args.modules_file) as f:
            modules += [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    if args.all:
        modules = available
    excluded = set(filter(None, args.exclude.split(",")))
    modules = [m for m in dict.fromkeys(modules) if m not in excluded]
    if not modules:
        die("no test modules given")
    unknown = [m for m in modules if m not in available]
    if unknown:
        die(f"no test module {', '.join(unknown)} in {suite_dir} (python3 -m test --list-tests lists the modules)")

    configs = [BASELINE] if args.baseline_only else ([] if args.reuse_baseline else [BASELINE]) + args.modes
    print(f"CPython regression tests: {len(modules)} modules; runs: {', '.join(configs)}; "
          f"jobs {args.jobs}; timeout {args.timeout}s; work dir {args.work_dir}", flush=True)

    results = {}  # (module, config) -> result
    if args.reuse_baseline:
        for module in modules:
            stored = os.path.join(args.work_dir, BASELINE, module + ".json")
            if not os.path.exists(stored):
                die(f"no stored baseline for {module} in {args.work_dir} (run --baseline-only first)")
            with open(stored) as f:
                results[(module, BASELINE)] = json.load(f)

    lock = threading.Lock()
    done = [0]
    total = len(modules) * len(configs)

    def job(module, config, attempt=0):
        result = run_module(args, module, config, attempt, suite_dir)
        if config == BASELINE and attempt == 0:
            with open(os.path.join(args.work_dir, BASELINE, module + ".json"), "w") as f:
                json.dump(result, f)
        with lock:
            if attempt == 0:
                done[0] += 1
                counter = f"[{done[0]}/{total}]"
            else:
                counter = "[rerun]"
            print(f"{counter} {module} {config}: {result['status']} ({len(result['tests'])} tests, "
                  f"{result['duration']}s)", flush=True)
        return result

    # Longest-looking first is unknowable up front; keep the given order, the
    # baseline and the modes of one module next to each other.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(job, module, config): (module, config) for module in modules for config in configs}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
    if args.baseline_only:
        failing = sum(1 for m in modules if results[(m, BASELINE)]["status"] != "ok")
        print(f"baseline stored in {args.work_dir}: {len(modules) - failing} modules ok, {failing} not ok")
        print(f"{len(modules)} passed, 0 failed")
        return 0

    verdicts = {}
    for module in modules:
        for mode in args.modes:
            ours, also, notes = compare(results[(module, BASELINE)], results[(module, mode)])
            attempt = 0
            while ours and attempt < args.reruns:
                attempt += 1
                rerun = job(module, mode, attempt)
                rerun_ours, rerun_also, rerun_notes = compare(results[(module, BASELINE)], rerun)
                if not rerun_ours:
                    notes = [f"FLAKY: differed once, agreed with the baseline on rerun {attempt}: " + "; ".join(ours[:3])] \
                        + rerun_notes
                    ours, also = [], rerun_also
                else:
                    ours = rerun_ours + [f"(the same on rerun {attempt})"]
            verdicts[(module, mode)] = (ours, also, notes)

    # The table: one line per module and mode.
    width = max(len(m) for m in modules) + 2
    print()
    print(f"{'module':<{width}}{'mode':<9}{'without hotpool':<22}{'with hotpool':<22}{'tests':>6}  verdict")
    passed = failed = compared = ours_tests = also_tests = 0
    for module in modules:
        base = results[(module, BASELINE)]
        for mode in args.modes:
            hot = results[(module, mode)]
            ours, also, notes = verdicts[(module, mode)]
            compared += len(hot["tests"])
            ours_tests += sum(1 for o in ours if not o.startswith("("))
            also_tests += len(also)
            if ours:
                failed += 1
                verdict = "FAILED (only under hotpool)"
            else:
                passed += 1
                verdict = "equal" + (f", {len(also)} failing also without hotpool" if also else "") + \
                    (", flaky" if any(n.startswith("FLAKY") for n in notes) else "")
            print(f"{module:<{width}}{mode:<9}{base['status'] + ' ' + str(base['duration']) + 's':<22}"
                  f"{hot['status'] + ' ' + str(hot['duration']) + 's':<22}{len(hot['tests']):>6}  {verdict}")

    print()
    for module in modules:
        for mode in args.modes:
            ours, also, notes = verdicts[(module, mode)]
            hot = results[(module, mode)]
            if ours:
                print(f"FAILED {module} [{mode}]:")
                for line in ours[:20]:
                    print(f"    {line}")
                print(f"    log: {hot['log']}")
                print(f"    reproduce: {hot['command']}")
                print(f"    baseline:  {results[(module, BASELINE)]['command']}")
            if also:
                print(f"also without hotpool {module} [{mode}]: " + "; ".join(a.split(':')[0] for a in also[:5])
                      + (f" (+{len(also) - 5})" if len(also) > 5 else ""))
            for note in notes[:5]:
                print(f"note {module} [{mode}]: {note}")
            if hot["hotpool_lines"]:
                print(f"hotpool said in {module} [{mode}]: " + " | ".join(hot["hotpool_lines"][:5]))
    print(f"tests: {compared} results compared under hotpool; {ours_tests} differences of ours; "
          f"{also_tests} failures also without hotpool")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
