# Suite "off" (sourced by scripts/bench): what interposition itself costs.
# One malloc-heavy real program (clang-format) runs without hotpool and
# with LD_PRELOAD=libhotpool.so HOTPOOL_MODE=off, alternating, and the
# medians of the children's CPU time (user+sys) are compared.
# Target (DESIGN.md, section 8): ratio <= 1.01.
#
# Also: the malloc calls of the workload (one profile run), so that readers
# see it is malloc-heavy, and, with valgrind, the instructions of one run
# each on a smaller input: deterministic where the times are noisy.

OFF_TARGET=1.01

suite_off() {
  local runs=${BENCH_RUNS:-11} kib=1536 callgrind_kib=256
  if [[ $BENCH_QUICK == 1 ]]; then runs=${BENCH_RUNS:-3} kib=384 callgrind_kib=64; fi
  clang_format_require

  local input work=$BENCH_DATA/off
  input=$(clang_format_input "$kib")
  mkdir -p "$work"
  local -a program
  mapfile -t program < <(clang_format_args "$input")
  local -a hotpool_off=(--preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=off)
  local reference=$work/reference.cpp line

  bench_log "suite off: $(clang_format_describe "$input")"
  bench_log "suite off: warm-up runs (not counted)"
  bench_measure line --stdout "$reference" -- "${program[@]}"
  bench_measure line "${hotpool_off[@]}" --stdout "$work/out.cpp" -- "${program[@]}"

  # Pairs in ABBA order: a slow drift of the machine's speed falls on both.
  local -a base_cpu=() off_cpu=() base_user=() off_user=() base_sys=() off_sys=()
  local -a base_wall=() off_wall=() base_rss=() off_rss=() pair_ratio=()
  local differing=0 i order side base off
  for ((i = 1; i <= runs; i++)); do
    if ((i % 2)); then order="base off"; else order="off base"; fi
    for side in $order; do
      if [[ $side == base ]]; then
        bench_measure base --stdout "$work/out.cpp" -- "${program[@]}"
      else
        bench_measure off "${hotpool_off[@]}" --stdout "$work/out.cpp" -- "${program[@]}"
      fi
      cmp -s "$reference" "$work/out.cpp" || { differing=$((differing + 1)); bench_log "  output of a $side run differs"; }
    done
    base_cpu+=("$(bench_field "$base" cpu_us)") off_cpu+=("$(bench_field "$off" cpu_us)")
    base_user+=("$(bench_field "$base" user_us)") off_user+=("$(bench_field "$off" user_us)")
    base_sys+=("$(bench_field "$base" sys_us)") off_sys+=("$(bench_field "$off" sys_us)")
    base_wall+=("$(bench_field "$base" wall_us)") off_wall+=("$(bench_field "$off" wall_us)")
    base_rss+=("$(bench_field "$base" maxrss_kb)") off_rss+=("$(bench_field "$off" maxrss_kb)")
    pair_ratio+=("$(bench_ratio "${off_cpu[-1]}" "${base_cpu[-1]}" 4)")
    bench_log "  pair $i/$runs: glibc $(bench_seconds "${base_cpu[-1]}"), hotpool off $(bench_seconds "${off_cpu[-1]}"), ratio ${pair_ratio[-1]}"
  done

  bench_log "suite off: one profile run to count the malloc calls"
  local report=$work/profile.json allocations frees calls_per_second
  rm -f "$report"
  bench_measure line --preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=profile --env HOTPOOL_OUTPUT="$report" \
    --stdout "$work/out.cpp" -- "${program[@]}"
  cmp -s "$reference" "$work/out.cpp" || { differing=$((differing + 1)); bench_log "  output of the profile run differs"; }
  allocations=$(bench_json_number "$report" totals allocations)
  frees=$(bench_json_number "$report" totals frees)

  local base_median off_median ratio paired_median
  base_median=$(bench_median "${base_cpu[@]}")
  off_median=$(bench_median "${off_cpu[@]}")
  ratio=$(bench_ratio "$off_median" "$base_median")
  paired_median=$(bench_median "${pair_ratio[@]}")
  calls_per_second=$(awk -v n="$allocations" -v us="$base_median" 'BEGIN { printf "%.1f", n / us }')

  local callgrind_row
  if [[ $BENCH_CALLGRIND == 0 ]]; then
    callgrind_row="| instructions (callgrind) | skipped (--no-callgrind) | | |"
  elif ! command -v valgrind >/dev/null; then
    callgrind_row="| instructions (callgrind) | skipped: valgrind is not installed | | |"
  else
    bench_log "suite off: instructions under callgrind, ${callgrind_kib} KiB input"
    local small base_ir off_ir
    local -a small_program
    small=$(clang_format_input "$callgrind_kib")
    mapfile -t small_program < <(clang_format_args "$small")
    bench_callgrind base_ir --stdout "$work/small-base.cpp" -- "${small_program[@]}"
    bench_callgrind off_ir "${hotpool_off[@]}" --stdout "$work/small-off.cpp" -- "${small_program[@]}"
    cmp -s "$work/small-base.cpp" "$work/small-off.cpp" ||
      { differing=$((differing + 1)); bench_log "  output of the callgrind runs differs"; }
    callgrind_row="| instructions, one run on ${callgrind_kib} KiB (callgrind) | $(bench_grouped "$base_ir") | $(bench_grouped "$off_ir") | $(bench_ratio "$off_ir" "$base_ir" 4) |"
  fi

  local verdict outputs
  if bench_le "$ratio" "$OFF_TARGET"; then verdict="**met**"; else verdict="**not met**"; fi
  if ((differing == 0)); then outputs="byte-identical in every run"; else outputs="**$differing runs differ**"; fi

  {
    printf '## off: the cost of interposition (HOTPOOL_MODE=off)\n\n'
    printf 'Workload: %s.  \nIts allocator calls, counted in a profile run: %s allocations (malloc, calloc, realloc, operator new, ...) and %s frees per run, %s M allocations per CPU-second.  \n' \
      "$(clang_format_describe "$input")" "$(bench_grouped "$allocations")" "$(bench_grouped "$frees")" \
      "$calls_per_second"
    printf 'Runs: %d pairs after one warm-up each, alternating (ABBA); times are the child'"'"'s CPU time (user+sys, wait4).  \n' "$runs"
    printf 'Machine: %s\n\n' "$(bench_environment)"
    printf '| measure | glibc alone | hotpool off | ratio |\n'
    printf '|---|---:|---:|---:|\n'
    printf '| CPU time, median of %d | %s | %s | **%s** |\n' "$runs" "$(bench_seconds "$base_median")" \
      "$(bench_seconds "$off_median")" "$ratio"
    printf '| CPU time, median of the %d paired ratios | | | %s |\n' "$runs" "$(bench_ratio "$paired_median" 1)"
    printf '| CPU time, fastest run | %s | %s | %s |\n' "$(bench_seconds "$(bench_min "${base_cpu[@]}")")" \
      "$(bench_seconds "$(bench_min "${off_cpu[@]}")")" \
      "$(bench_ratio "$(bench_min "${off_cpu[@]}")" "$(bench_min "${base_cpu[@]}")")"
    printf '| paired ratios, lowest to highest | | | %s to %s |\n' "$(bench_ratio "$(bench_min "${pair_ratio[@]}")" 1)" \
      "$(bench_ratio "$(bench_max "${pair_ratio[@]}")" 1)"
    bench_median_row "user time, median" bench_seconds base_user off_user
    bench_median_row "system time, median" bench_seconds base_sys off_sys
    bench_median_row "wall time, median" bench_seconds base_wall off_wall
    bench_median_row "peak RSS, median" bench_mib base_rss off_rss
    printf '%s\n\n' "$callgrind_row"
    printf 'Target: CPU time ratio <= %s: %s (%s). Outputs: %s.\n' "$OFF_TARGET" "$verdict" "$ratio" "$outputs"
  } | bench_save off-overhead.md

  ((differing == 0)) || bench_die "suite off: outputs differ between runs"
}
