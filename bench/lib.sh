# Helpers shared by the benchmark suites (sourced by scripts/bench).
#
# Globals set by scripts/bench before a suite runs:
#   BENCH_ROOT       the source tree
#   BENCH_BUILD_DIR  the build directory (libhotpool.so, bench/hotpool-cputime)
#   BENCH_LIBRARY    libhotpool.so
#   BENCH_CPUTIME    the stopwatch (bench/tools/cputime.cpp)
#   BENCH_DATA       cached inputs and scratch outputs (under the build dir)
#   BENCH_RESULTS    where suites save their Markdown tables (gitignored)
#   BENCH_RUNS       runs asked for with --runs (empty: the suite's default)
#   BENCH_QUICK      1 with --quick: fewer runs, smaller inputs
#   BENCH_CALLGRIND  0 with --no-callgrind
#   BENCH_COMMIT     the source the build was made from ("abc1234" or "abc1234 + local changes")
#   BENCH_MICRO      the micro benchmark program (bench/micro/allocator_bench.cpp)
#   BENCH_FLOOR_LIBRARY  suite micro's floor (bench/tools/floor_allocator.cpp)
#   BENCH_DEMO_SERVER  the demo_server workload
#   BENCH_THREAD_CROWD the thread_crowd workload (suite threads)

bench_log() { printf '%s\n' "$*" >&2; }
bench_die() { printf 'scripts/bench: %s\n' "$*" >&2; exit 1; }

# bench_measure VAR [--preload LIB] [--env NAME=VALUE]... [--stdin F] [--stdout F] -- PROGRAM ARGS...
# Runs the program once under the stopwatch; VAR gets its line
# "cpu_us=N user_us=N sys_us=N wall_us=N maxrss_kb=N status=N".
# A program that fails stops the benchmark, its stderr shown.
bench_measure() {
  local -n _result=$1
  shift
  local errors=$BENCH_DATA/stderr.txt
  _result=$("$BENCH_CPUTIME" "$@" 2>"$errors") || bench_die "the stopwatch failed: $(cat "$errors")"
  if [[ $(bench_field "$_result" status) != 0 ]]; then
    bench_die "run failed ($_result): $*; stderr: $(head -c 2000 "$errors")"
  fi
}

# bench_try VAR ERRORS [stopwatch options] -- PROGRAM ARGS...: as
# bench_measure, but a program that fails does not stop the benchmark: the
# status field of VAR's line tells, and the file ERRORS keeps its stderr.
bench_try() {
  local -n _try_result=$1
  local errors=$2
  shift 2
  _try_result=$("$BENCH_CPUTIME" "$@" 2>"$errors") || bench_die "the stopwatch failed: $(cat "$errors")"
}

# bench_status_text STATUS: "exit status N", or "killed by signal N" for 128+N.
bench_status_text() {
  if (($1 > 128)); then printf 'killed by signal %d (%s)\n' $(($1 - 128)) "$(kill -l $(($1 - 128)) 2>/dev/null || echo '?')"
  else printf 'exit status %d\n' "$1"
  fi
}

# bench_field LINE NAME: the value of NAME=value in a stopwatch line.
bench_field() {
  local field
  for field in $1; do
    [[ $field == "$2="* ]] && { printf '%s\n' "${field#*=}"; return 0; }
  done
  bench_die "no $2 in '$1'"
}

# bench_median NUMBERS...: the median (mean of the middle two for an even count).
bench_median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit 1
    if (NR % 2) printf "%.6f\n", v[(NR + 1) / 2]; else printf "%.6f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# bench_elapsed SECONDS_SINCE: "m:ss" since a $SECONDS value, for progress lines.
bench_elapsed() { local s=$((SECONDS - $1)); printf '%d:%02d\n' $((s / 60)) $((s % 60)); }

bench_min() { printf '%s\n' "$@" | sort -g | head -n 1; }
bench_max() { printf '%s\n' "$@" | sort -g | tail -n 1; }

# bench_ratio A B [DECIMALS]: A / B ("-" when B is 0).
bench_ratio() { awk -v a="$1" -v b="$2" -v d="${3:-3}" 'BEGIN { if (b == 0) print "-"; else printf "%.*f\n", d, a / b }'; }

# bench_median_row LABEL FORMAT ARRAY_A ARRAY_B: a table row "label | median
# of A | median of B | B/A", each median formatted by the function FORMAT.
bench_median_row() {
  local -n _row_a=$3 _row_b=$4
  local median_a median_b
  median_a=$(bench_median "${_row_a[@]}")
  median_b=$(bench_median "${_row_b[@]}")
  printf '| %s | %s | %s | %s |\n' "$1" "$("$2" "$median_a")" "$("$2" "$median_b")" \
    "$(bench_ratio "$median_b" "$median_a")"
}

# bench_le A B: true if A <= B (floating point).
bench_le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }

# Formatting for the tables.
bench_seconds() { awk -v us="$1" 'BEGIN { printf "%.3f s\n", us / 1e6 }'; }
bench_mib() { awk -v kb="$1" 'BEGIN { printf "%.1f MiB\n", kb / 1024 }'; }
bench_grouped() { printf '%s\n' "$1" | sed -e ':again' -e 's/^\([0-9]\+\)\([0-9]\{3\}\)/\1,\2/' -e 't again'; }

# bench_json_number FILE KEY...: one number from a JSON report, e.g.
# bench_json_number report.json totals allocations.
bench_json_number() {
  /usr/bin/python3 - "$@" <<'PY' || bench_die "cannot read ${*:2} from $1"
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    value = value[key]
print(int(value))
PY
}

# bench_callgrind VAR [stopwatch options] -- PROGRAM ARGS...: instructions
# executed by the program (callgrind's Ir total), stdout to BENCH_DATA.
# Deterministic, so one run is enough.
bench_callgrind() {
  local -n _instructions=$1
  shift
  local options=() out_file=$BENCH_DATA/callgrind.out line
  while [[ $1 != -- ]]; do options+=("$1"); shift; done
  shift
  bench_measure line "${options[@]}" -- /usr/bin/valgrind --tool=callgrind --callgrind-out-file="$out_file" "$@"
  _instructions=$(awk '$1 == "summary:" { print $2 }' "$out_file")
  [[ -n $_instructions ]] || bench_die "no instruction count in $out_file"
  rm -f "$out_file"
}

# A line describing this machine and build, for the tables.
bench_environment() {
  local cpu commit build_type
  cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  commit=${BENCH_COMMIT:-unknown}
  build_type=$(awk -F= '/^CMAKE_BUILD_TYPE:/ { print $2 }' "$BENCH_BUILD_DIR/CMakeCache.txt")
  printf '%s, %s CPUs, Linux %s; hotpool %s, %s build\n' "${cpu:-unknown CPU}" "$(nproc)" "$(uname -r)" \
    "$commit" "${build_type:-unknown}"
}

# bench_save NAME: copies stdin to stdout and to BENCH_RESULTS/NAME.
bench_save() {
  mkdir -p "$BENCH_RESULTS"
  tee "$BENCH_RESULTS/$1"
  bench_log "saved ${BENCH_RESULTS#"$BENCH_ROOT"/}/$1"
}
