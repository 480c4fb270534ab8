# Suite "micro" (sourced by scripts/bench): what one malloc+free pair costs
# under each allocator. hotpool-micro (bench/micro/allocator_bench.cpp, Google
# Benchmark) runs once per allocator and round, under LD_PRELOAD of that
# allocator (none for glibc); the rounds visit the allocators in rotated
# orders, and each benchmark's median over the rounds is reported, in CPU
# nanoseconds per pair and as a ratio to glibc.
#
# hotpool appears twice: auto (the default mode, which pools a class once
# its policy has seen a few thousand short-lived allocations of it: the
# benchmark's own warm-up and iteration-count probing give it that) and
# fixed, with HOTPOOL_CLASSES set to exactly the sizes under test, pooled
# from the first call; fixed once more with HOTPOOL_CHECKS=off, to show what
# the hardening checks cost.
#
# Last comes the floor (bench/tools/floor_allocator.cpp), not an allocator:
# a bare per-thread LIFO of blocks, so that the pair and batch figures can
# be read against what the benchmark loop itself costs on this machine
# with the least work any thread cache does (run for those two families only).

MICRO_SIZES=16,32,64,128,256,512,1K,4K,16K,32K,64K,256K
MICRO_QUICK_SIZES=16,64,256,4K,64K

suite_micro() {
  local rounds=${BENCH_RUNS:-3} min_time=0.1 sizes=$MICRO_SIZES
  if [[ $BENCH_QUICK == 1 ]]; then rounds=${BENCH_RUNS:-1} min_time=0.01 sizes=$MICRO_QUICK_SIZES; fi
  [[ -x $BENCH_MICRO ]] ||
    bench_die "suite micro: $BENCH_MICRO was not built (is Google Benchmark, Debian libbenchmark-dev, installed?)"

  local -a allocators
  mapfile -t allocators < <(bench_allocators_require glibc jemalloc tcmalloc mimalloc hotpool-auto hotpool-fixed hotpool-fixed-nochecks floor)
  local work=$BENCH_DATA/micro start=$SECONDS
  rm -rf "$work"
  mkdir -p "$work"
  bench_log "suite micro: hotpool-micro under ${allocators[*]}; $rounds rounds, sizes $sizes, at least ${min_time}s a benchmark"

  local -a failures=() options order
  local round name line status
  for ((round = 1; round <= rounds; round++)); do
    mapfile -t order < <(bench_rotate $((round - 1)) "${allocators[@]}")
    for name in "${order[@]}"; do
      bench_allocator_options options "$name" "$sizes"
      if [[ $name == hotpool-* ]]; then
        # The exit report, written after the last benchmark, costs the
        # timings nothing (auto records either way): it tells how much
        # the pools served.
        mkdir -p "$work/reports/$name"
        options=("${options[@]/#HOTPOOL_REPORT=off/HOTPOOL_OUTPUT=$work/reports/$name/round-$round.json}")
      fi
      local output=$work/$name-$round.json
      local -a program=("$BENCH_MICRO" "--min-time=$min_time" "--sizes=$sizes" --benchmark_format=json)
      [[ $name == floor ]] && program+=('--benchmark_filter=^(pair|batch)/')
      bench_try line "$work/$name-$round.stderr" "${options[@]}" --stdout "$output" -- "${program[@]}"
      status=$(bench_field "$line" status)
      if [[ $status != 0 ]]; then
        failures+=("$name, round $round: $(bench_status_text "$status"): $(bench_shell_command "${options[@]}" -- "${program[@]}")")
        bench_log "  round $round/$rounds, $name: FAILED ($(bench_status_text "$status")): $(tail -n 3 "$work/$name-$round.stderr")"
        mv "$output" "$work/$name-$round.failed" 2>/dev/null || true
        continue
      fi
      bench_log "  round $round/$rounds, $name: $(bench_seconds "$(bench_field "$line" wall_us)") ($(bench_elapsed "$start") in all)"
    done
  done

  local -a labels=()
  for name in "${allocators[@]}"; do labels+=("$name=$(bench_allocator_label "$name")"); done
  {
    printf '## micro: ns per malloc+free pair, by allocator\n\n'
    printf 'Program: hotpool-micro (bench/micro/allocator_bench.cpp, Google Benchmark %s, compiled with -fno-builtin), run under each allocator by LD_PRELOAD (glibc: none).  \n' \
      "$(dpkg-query -W -f='${Version}' libbenchmark-dev 2>/dev/null | sed 's/-[^-]*$//')"
    printf 'Cells: CPU time per pair in ns (benchmark'"'"'s cpu_time per iteration, divided by the pairs an iteration makes), the median of %d round(s) that visit the allocators in rotated orders; in parentheses the ratio to glibc (lower is better).  \n' "$rounds"
    printf 'hotpool auto pools a class once its policy has seen it hot and short-lived (the warm-up of each benchmark does that); hotpool fixed runs with HOTPOOL_CLASSES=%s, pooled from the start. hotpool writes its JSON exit report after the last benchmark (HOTPOOL_REPORT only decides that; the recording is the same).  \n' "$sizes"
    printf 'floor is not an allocator (bench/tools/floor_allocator.cpp): per thread, a bare LIFO stack of 256 KiB blocks, no size classes, counters or checks; a malloc is a pop, a free a range check and a push. Its pair and batch figures are what the benchmark loop costs on this machine with the least work any thread cache does: read the allocators'"'"' ns against it (it does not run the producer/consumer benchmarks, and its summary row is over pair and batch only).  \n'
    printf 'Machine: %s\n\n' "$(bench_environment)"
    /usr/bin/python3 "$BENCH_ROOT/bench/tools/tables.py" micro "$work" "${labels[@]}"
    local counts allocations hits shares=()
    for name in "${allocators[@]}"; do
      [[ $name == hotpool-* && -d $work/reports/$name ]] || continue
      counts=$(/usr/bin/python3 "$BENCH_ROOT/bench/tools/tables.py" pool-share "$work/reports/$name") || continue
      read -r allocations hits <<<"$counts"
      shares+=("$(bench_allocator_label "$name") $(bench_grouped "$hits") of $(bench_grouped "$allocations") ($(bench_ratio $((hits * 100)) "$allocations" 1)%)")
    done
    if ((${#shares[@]})); then
      printf '\nAllocations served from pools, all rounds together (hotpool'"'"'s exit reports, which also count the benchmark harness'"'"'s own allocations): %s.\n' \
        "$(IFS=';'; echo "${shares[*]}" | sed 's/;/; /g')"
    fi
    if ((${#failures[@]})); then
      printf '\n**Failed runs** (no numbers from them above):\n\n'
      printf -- '- %s\n' "${failures[@]}"
    fi
  } | bench_save micro.md

  ((${#failures[@]} == 0)) || bench_die "suite micro: ${#failures[@]} runs failed (listed above)"
}
