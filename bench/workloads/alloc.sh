# The workloads of suite alloc (sourced by scripts/bench): unmodified
# programs from Debian packages doing malloc-heavy work, plus demo_server.
# Each one is deterministic, so every allocator's stdout can be compared
# byte for byte with glibc's. Sizes are chosen for about a second of CPU
# time each under glibc (--quick: a few tenths).
#
#   clang-format  clang-format --style=LLVM on 768 KiB of libstdc++ headers
#   python3       alloc_python.py: dicts, strings, sort, json (PYTHONMALLOC=malloc)
#   sqlite3       an in-memory database: single-row INSERTs, indexed queries, aggregates
#   perl          alloc_perl.pl: hashes, arrays, sort, join, regexes
#   g++           g++ -O1 -S -o - alloc_gxx.cpp (front end, optimizer, code generator)
#   demo_server   build/bench/demo_server 300000 2 (two threads)

ALLOC_WORKLOADS=(clang-format python3 sqlite3 perl g++ demo_server)
ALLOC_PACKAGES=(clang-format python3 sqlite3 perl g++)

ALLOC_PYTHON=/usr/bin/python3
ALLOC_SQLITE=/usr/bin/sqlite3
ALLOC_PERL=/usr/bin/perl
ALLOC_GXX=/usr/bin/g++

alloc_workloads_require() {
  hotpool_install_packages "${ALLOC_PACKAGES[@]}" >&2
  clang_format_require >&2
  local program
  for program in "$ALLOC_PYTHON" "$ALLOC_SQLITE" "$ALLOC_PERL" "$ALLOC_GXX" "$BENCH_DEMO_SERVER"; do
    [[ -x $program ]] || bench_die "suite alloc: $program is missing"
  done
}

# alloc_workload NAME: sets ALLOC_PROGRAM (the command line) and
# ALLOC_OPTIONS (the stopwatch's --env and --stdin options) for one run of
# NAME, making its input first if it is not cached in BENCH_DATA yet.
alloc_workload() {
  local quick=$BENCH_QUICK sources=$BENCH_ROOT/bench/workloads
  ALLOC_OPTIONS=()
  case $1 in
    clang-format)
      local input
      input=$(clang_format_input "$( ((quick)) && echo 128 || echo 768)")
      mapfile -t ALLOC_PROGRAM < <(clang_format_args "$input") ;;
    python3)
      # pymalloc off, so that Python's objects come from the allocator
      # under test; a fixed hash seed; no user site directory (-s).
      ALLOC_OPTIONS=(--env PYTHONMALLOC=malloc --env PYTHONHASHSEED=0 --env PYTHONDONTWRITEBYTECODE=1)
      ALLOC_PROGRAM=("$ALLOC_PYTHON" -s "$sources/alloc_python.py" "$( ((quick)) && echo 15000 || echo 80000)") ;;
    sqlite3)
      local rows script
      rows=$( ((quick)) && echo 20000 || echo 100000)
      script=$BENCH_DATA/alloc-sqlite-$rows.sql
      if [[ ! -s $script ]]; then
        "$ALLOC_PYTHON" -s "$sources/alloc_sqlite.py" "$rows" >"$script.partial" || bench_die "cannot make $script"
        mv "$script.partial" "$script"
      fi
      ALLOC_OPTIONS=(--stdin "$script")
      ALLOC_PROGRAM=("$ALLOC_SQLITE" -batch :memory:) ;;
    perl)
      ALLOC_OPTIONS=(--env PERL_HASH_SEED=0 --env PERL_PERTURB_KEYS=0)
      ALLOC_PROGRAM=("$ALLOC_PERL" "$sources/alloc_perl.pl" "$( ((quick)) && echo 15000 || echo 80000)") ;;
    g++)
      # LANG=C: the same diagnostics whatever the caller's locale.
      ALLOC_OPTIONS=(--env LANG=C --env LC_ALL=C)
      if ((quick)); then
        ALLOC_PROGRAM=("$ALLOC_GXX" -std=c++20 -fsyntax-only "$sources/alloc_gxx.cpp")
      else
        ALLOC_PROGRAM=("$ALLOC_GXX" -std=c++20 -O1 -S -o - "$sources/alloc_gxx.cpp")
      fi ;;
    demo_server)
      ALLOC_PROGRAM=("$BENCH_DEMO_SERVER" "$( ((quick)) && echo 50000 || echo 300000)" 2) ;;
    *) bench_die "unknown workload '$1'" ;;
  esac
}

# alloc_workload_describe NAME: the program, its version and its input, for the tables.
alloc_workload_describe() {
  local version
  alloc_workload "$1"
  case $1 in
    clang-format)
      clang_format_describe "${ALLOC_PROGRAM[-1]}" ;;
    python3)
      version=$("$ALLOC_PYTHON" --version 2>&1)
      printf '%s, PYTHONMALLOC=malloc: bench/workloads/alloc_python.py %s (dicts, strings, sort, json)\n' "$version" "${ALLOC_PROGRAM[-1]}" ;;
    sqlite3)
      version=$("$ALLOC_SQLITE" --version | awk '{ print $1 }')
      printf 'sqlite3 %s, in-memory database: bench/workloads/alloc_sqlite.py %s (single-row INSERTs, indexed queries, aggregates)\n' \
        "$version" "$(basename "${ALLOC_OPTIONS[1]}" .sql | sed 's/.*-//')" ;;
    perl)
      version=$("$ALLOC_PERL" -e 'printf "%vd", $^V')
      printf 'perl %s: bench/workloads/alloc_perl.pl %s (hashes, arrays, sort, join, regexes)\n' "$version" "${ALLOC_PROGRAM[-1]}" ;;
    g++)
      version=$("$ALLOC_GXX" -dumpfullversion)
      printf 'g++ %s %s bench/workloads/alloc_gxx.cpp (driver and cc1plus)\n' "$version" "${ALLOC_PROGRAM[*]:1:${#ALLOC_PROGRAM[@]}-2}" ;;
    demo_server)
      printf 'demo_server %s %s (bench/workloads/demo_server.cpp, two threads)\n' "${ALLOC_PROGRAM[1]}" "${ALLOC_PROGRAM[2]}" ;;
  esac
}
