# Suite "threads" (sourced by scripts/bench): what a crowd of threads costs
# in memory. bench/workloads/thread_crowd.cpp runs with 8 and with 100
# threads, each holding 64 blocks of 16-527 bytes (25 size classes) while
# it replaces them at random, all of them holding theirs at once at the
# end; under glibc (no preload), jemalloc, tcmalloc, mimalloc, hotpool auto
# and hotpool profile (exit reports off), side by side in one run:
#
#   1. one untimed round: each allocator's stdout is compared with glibc's;
#   2. N rounds, the allocators in an order rotated by one each round.
#
# Reported: per thread count and allocator, the medians of peak RSS and CPU
# time (user+sys), their ratios to glibc, and the peak RSS above glibc's
# per thread: what the allocator's per-thread state and caches cost.

THREADS_COUNTS=(8 100)

suite_threads() {
  local runs=${BENCH_RUNS:-5} replacements=20000
  if [[ $BENCH_QUICK == 1 ]]; then
    runs=${BENCH_RUNS:-1}
    replacements=2000
  fi
  local program=$BENCH_THREAD_CROWD
  [[ -x $program ]] || bench_die "suite threads: $program is missing"
  local -a allocators
  mapfile -t allocators < <(bench_allocators_require glibc jemalloc tcmalloc mimalloc hotpool-auto hotpool-profile)
  local work=$BENCH_DATA/threads start=$SECONDS
  rm -rf "$work"
  mkdir -p "$work"
  local runs_tsv=$work/runs.tsv
  printf 'round\tthreads\tallocator\tcpu_us\tmaxrss_kb\n' >"$runs_tsv"
  local -a failures=() options order
  local threads name line round

  bench_log "suite threads: thread_crowd with ${THREADS_COUNTS[*]} threads under ${allocators[*]}; $runs rounds"
  for threads in "${THREADS_COUNTS[@]}"; do
    bench_measure line --stdout "$work/glibc.$threads.out" -- "$program" "$threads" "$replacements"
    for name in "${allocators[@]:1}"; do
      bench_allocator_options options "$name"
      bench_try line "$work/stderr.txt" "${options[@]}" --stdout "$work/out.txt" -- "$program" "$threads" "$replacements"
      if [[ $(bench_field "$line" status) != 0 ]]; then
        failures+=("$threads threads under $name: $(bench_status_text "$(bench_field "$line" status)"); command: \`$(bench_shell_command "${options[@]}" -- "$program" "$threads" "$replacements")\`")
      elif ! cmp -s "$work/glibc.$threads.out" "$work/out.txt"; then
        failures+=("$threads threads under $name: stdout differs from glibc's; command: \`$(bench_shell_command "${options[@]}" -- "$program" "$threads" "$replacements")\`")
      fi
    done
  done
  ((${#failures[@]} == 0)) || { printf -- '- %s\n' "${failures[@]}" >&2; bench_die "suite threads: ${#failures[@]} failed or differing runs"; }

  for ((round = 1; round <= runs; round++)); do
    mapfile -t order < <(bench_rotate $((round - 1)) "${allocators[@]}")
    for threads in "${THREADS_COUNTS[@]}"; do
      for name in "${order[@]}"; do
        bench_allocator_options options "$name"
        bench_measure line "${options[@]}" --stdout "$work/out.txt" -- "$program" "$threads" "$replacements"
        cmp -s "$work/glibc.$threads.out" "$work/out.txt" ||
          bench_die "suite threads: $threads threads under $name: stdout differs from glibc's"
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$threads" "$name" "$(bench_field "$line" cpu_us)" \
          "$(bench_field "$line" maxrss_kb)" >>"$runs_tsv"
      done
    done
    bench_log "  round $round/$runs ($(bench_elapsed "$start") in all)"
  done

  {
    printf '## threads: a crowd of threads, each using many size classes a little\n\n'
    printf 'bench/workloads/thread_crowd.cpp: each thread holds 64 blocks of 16-527 bytes, replaces one at random %s times, then all hold theirs at once. Runs: %d round(s), the allocators in an order rotated by one each round; medians. hotpool runs with HOTPOOL_REPORT=off.  \n' \
      "$replacements" "$runs"
    printf 'Machine: %s\n\n' "$(bench_environment)"
    local glibc_rss glibc_cpu rss cpu
    for threads in "${THREADS_COUNTS[@]}"; do
      printf '**%s threads**\n\n' "$threads"
      printf '| allocator | peak RSS | ratio | above glibc, per thread | CPU time | ratio |\n|---|---:|---:|---:|---:|---:|\n'
      glibc_rss=$(threads_median "$runs_tsv" "$threads" glibc 5)
      glibc_cpu=$(threads_median "$runs_tsv" "$threads" glibc 4)
      for name in "${allocators[@]}"; do
        rss=$(threads_median "$runs_tsv" "$threads" "$name" 5)
        cpu=$(threads_median "$runs_tsv" "$threads" "$name" 4)
        printf '| %s | %s | %s | %s | %s | %s |\n' "$(bench_allocator_label "$name")" "$(bench_mib "$rss")" \
          "$(bench_ratio "$rss" "$glibc_rss")" \
          "$(awk -v a="$rss" -v b="$glibc_rss" -v n="$threads" 'BEGIN { printf "%+.0f KiB\n", (a - b) / n }')" \
          "$(bench_seconds "$cpu")" "$(bench_ratio "$cpu" "$glibc_cpu")"
      done
      printf '\n'
    done
    printf 'Outputs: every run of every allocator wrote byte-identical stdout to glibc'"'"'s. Raw runs: %s.\n' \
      "${runs_tsv#"$BENCH_ROOT"/}"
  } | bench_save threads.md
}

# threads_median RUNS_TSV THREADS ALLOCATOR COLUMN: the median of a column
# (4: cpu_us, 5: maxrss_kb) over the rounds.
threads_median() {
  local -a values
  mapfile -t values < <(awk -F'\t' -v t="$2" -v a="$3" -v c="$4" 'NR > 1 && $2 == t && $3 == a { print $c }' "$1")
  bench_median "${values[@]}"
}
