# The allocators the micro and alloc suites compare (sourced by scripts/bench).
# Each is a name, a label for the tables and the stopwatch options that
# select it: none for glibc, LD_PRELOAD of a Debian package's library for
# the others, libhotpool.so plus HOTPOOL_* settings for hotpool.
#
#   glibc          the C library's malloc (no preload): the baseline of every ratio
#   jemalloc       Debian libjemalloc2
#   tcmalloc       Debian libtcmalloc-minimal4 (gperftools' tcmalloc without the profiler)
#   mimalloc       Debian libmimalloc2.0
#   hotpool-auto   libhotpool.so, HOTPOOL_MODE=auto (the default)
#   hotpool-profile  libhotpool.so, HOTPOOL_MODE=profile (records, pools nothing)
#   hotpool-fixed  libhotpool.so, HOTPOOL_MODE=fixed, HOTPOOL_CLASSES from the caller
#   hotpool-fixed-nochecks  the same with HOTPOOL_CHECKS=off: what the
#                  hardening checks (double/invalid free detection) cost
#   floor          not an allocator: bench/tools/floor_allocator.cpp, a bare
#                  per-thread LIFO of blocks, the least any thread cache does
#                  (suite micro, pair and batch: what the benchmark loop costs)
#
# An allocator whose package cannot be installed is left out of the run,
# with a note in the table (bench_allocator_missing).

declare -A BENCH_ALLOCATOR_PACKAGE=(
  [jemalloc]=libjemalloc2 [tcmalloc]=libtcmalloc-minimal4 [mimalloc]=libmimalloc2.0
)
declare -A BENCH_ALLOCATOR_SONAME=(
  [jemalloc]=libjemalloc.so.2 [tcmalloc]=libtcmalloc_minimal.so.4 [mimalloc]=libmimalloc.so.2
)

# bench_allocators_require NAME...: installs the packages of the third-party
# allocators among NAME... and prints the names that are usable, one a line.
bench_allocators_require() {
  local name packages=()
  for name in "$@"; do
    [[ -n ${BENCH_ALLOCATOR_PACKAGE[$name]:-} ]] && packages+=("${BENCH_ALLOCATOR_PACKAGE[$name]}")
  done
  ((${#packages[@]} == 0)) || hotpool_install_packages "${packages[@]}" >&2 ||
    bench_log "scripts/bench: could not install every allocator package (${packages[*]}); going on without the missing ones"
  for name in "$@"; do
    if [[ -n ${BENCH_ALLOCATOR_PACKAGE[$name]:-} && ! -f $(bench_allocator_library "$name") ]]; then
      bench_log "scripts/bench: $name left out: $(bench_allocator_library "$name") is missing (Debian package ${BENCH_ALLOCATOR_PACKAGE[$name]})"
      continue
    fi
    printf '%s\n' "$name"
  done
}

# bench_allocator_library NAME: the library a third-party allocator preloads.
bench_allocator_library() {
  local multiarch
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  printf '/usr/lib/%s/%s\n' "$multiarch" "${BENCH_ALLOCATOR_SONAME[$1]}"
}

# bench_allocator_label NAME: how the tables name it, with its version.
bench_allocator_label() {
  local version
  case $1 in
    glibc) version=$(ldd --version 2>/dev/null | awk 'NR == 1 { print $NF }'); printf 'glibc %s\n' "$version" ;;
    jemalloc | tcmalloc | mimalloc)
      version=$(dpkg-query -W -f='${Version}' "${BENCH_ALLOCATOR_PACKAGE[$1]}" 2>/dev/null | sed 's/-[^-]*$//; s/+.*//')
      printf '%s %s\n' "$1" "$version" ;;
    hotpool-auto) printf 'hotpool auto\n' ;;
    hotpool-profile) printf 'hotpool profile\n' ;;
    hotpool-fixed) printf 'hotpool fixed\n' ;;
    hotpool-fixed-nochecks) printf 'hotpool fixed, HOTPOOL_CHECKS=off\n' ;;
    floor) printf 'floor (a bare LIFO)\n' ;;
    *) printf '%s\n' "$1" ;;
  esac
}

# bench_allocator_options VAR NAME [HOTPOOL_CLASSES]: VAR (an array) gets the
# stopwatch options that run a program under NAME. hotpool's exit report is
# off: a timed run measures the allocator, not the report; so are the call
# stacks of sampled allocations in modes auto and fixed (HOTPOOL_SITES=auto:
# nothing would show them), as when hotpool is preloaded for speed alone.
# hotpool-profile captures them (HOTPOOL_SITES=on), as a profiling run does.
bench_allocator_options() {
  local -n _options=$1
  case $2 in
    glibc) _options=() ;;
    jemalloc | tcmalloc | mimalloc) _options=(--preload "$(bench_allocator_library "$2")") ;;
    hotpool-auto) _options=(--preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=auto --env HOTPOOL_REPORT=off) ;;
    hotpool-profile)
      _options=(--preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=profile --env HOTPOOL_REPORT=off --env HOTPOOL_SITES=on) ;;
    hotpool-fixed)
      _options=(--preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=fixed --env "HOTPOOL_CLASSES=${3:?hotpool-fixed needs HOTPOOL_CLASSES}"
                --env HOTPOOL_REPORT=off) ;;
    hotpool-fixed-nochecks)
      _options=(--preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=fixed --env "HOTPOOL_CLASSES=${3:?hotpool-fixed needs HOTPOOL_CLASSES}"
                --env HOTPOOL_CHECKS=off --env HOTPOOL_REPORT=off) ;;
    floor) _options=(--preload "$BENCH_FLOOR_LIBRARY") ;;
    *) bench_die "unknown allocator '$2'" ;;
  esac
}

# bench_rotate N ITEMS...: the items rotated left by N (interleaved orders).
bench_rotate() {
  local n=$1
  shift
  local -a items=("$@")
  local count=${#items[@]} i
  for ((i = 0; i < count; i++)); do printf '%s\n' "${items[(i + n) % count]}"; done
}

# bench_shell_command [stopwatch options] -- PROGRAM ARGS...: the same run as
# a shell command line, for reproducing a failure by hand.
bench_shell_command() {
  local words=() redirections="" stdin=/dev/null
  while [[ $1 != -- ]]; do
    case $1 in
      --preload) words+=("LD_PRELOAD=$(printf '%q' "$2")"); shift 2 ;;
      --env) words+=("$(printf '%q' "$2")"); shift 2 ;;
      --stdin) stdin=$2; shift 2 ;;
      --stdout) redirections+=" > $(printf '%q' "$2")"; shift 2 ;;
      *) shift ;;
    esac
  done
  shift
  local word
  for word in "$@"; do words+=("$(printf '%q' "$word")"); done
  printf '%s < %s%s\n' "${words[*]}" "$(printf '%q' "$stdin")" "$redirections"
}
