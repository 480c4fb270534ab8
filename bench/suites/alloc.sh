# Suite "alloc" (sourced by scripts/bench): whole programs under each
# allocator. Every workload of bench/workloads/alloc.sh runs with no preload
# (glibc) and with LD_PRELOAD of jemalloc, tcmalloc, mimalloc and hotpool
# (mode auto, exit report off), side by side in one run:
#
#   1. one untimed round: each allocator's stdout is compared byte for
#      byte with glibc's (and every timed run's again afterwards);
#   2. N timed rounds; each visits the workloads in turn and, per workload,
#      the allocators in an order rotated by one each round, so that a
#      drift of the machine's speed falls on all of them alike;
#   3. one run per workload under hotpool auto with its JSON report on, for
#      the share of allocations served from pools (totals.pool_hits /
#      totals.allocations, summed over the processes of the run).
#
# Reported: medians of the children's CPU time (user+sys) and peak RSS,
# their ratios to glibc, the geometric mean of the ratios per allocator, a
# plot (gnuplot, SVG) and the raw runs (BENCH_DATA/alloc/runs.tsv). A
# crash or an output that differs from glibc's is listed with the command
# that reproduces it, and fails the suite after the tables are printed.

suite_alloc() {
  local runs=${BENCH_RUNS:-11}
  [[ $BENCH_QUICK == 1 ]] && runs=${BENCH_RUNS:-1}
  alloc_workloads_require
  local -a allocators
  mapfile -t allocators < <(bench_allocators_require glibc jemalloc tcmalloc mimalloc hotpool-auto)
  local plot_note=""
  if ! hotpool_install_packages gnuplot-nox >&2 || ! command -v gnuplot >/dev/null; then
    plot_note="no plot: gnuplot (Debian gnuplot-nox) could not be installed"
    bench_log "suite alloc: $plot_note"
  fi

  local work=$BENCH_DATA/alloc start=$SECONDS
  rm -rf "$work"
  mkdir -p "$work"
  local runs_tsv=$work/runs.tsv workloads_tsv=$work/workloads.tsv
  printf 'round\tworkload\tallocator\tcpu_us\tuser_us\tsys_us\twall_us\tmaxrss_kb\tstatus\tsame_output\n' >"$runs_tsv"
  ALLOC_FAILURES=()

  bench_log "suite alloc: ${ALLOC_WORKLOADS[*]} under ${allocators[*]}; $runs timed rounds"
  bench_log "suite alloc: untimed round, outputs compared with glibc's"
  local workload name line summary
  for workload in "${ALLOC_WORKLOADS[@]}"; do
    alloc_workload "$workload"
    alloc_run line glibc "$workload" "$work/$workload.glibc.out" untimed
    [[ $(bench_field "$line" status) == 0 ]] ||
      bench_die "suite alloc: $workload fails under glibc alone: $(tail -n 5 "$work/stderr.txt")"
    summary="$workload: glibc $(bench_seconds "$(bench_field "$line" cpu_us)")"
    for name in "${allocators[@]:1}"; do
      alloc_run line "$name" "$workload" "$work/$workload.$name.out" untimed
      summary+=", $name $(alloc_outcome "$line" "$work/$workload.$name.out" "$workload")"
      [[ $(bench_field "$line" status) == 0 ]] && cmp -s "$work/$workload.glibc.out" "$work/$workload.$name.out" &&
        rm -f "$work/$workload.$name.out"
    done
    bench_log "  $summary"
  done

  local round same
  local -a order
  for ((round = 1; round <= runs; round++)); do
    mapfile -t order < <(bench_rotate $((round - 1)) "${allocators[@]}")
    for workload in "${ALLOC_WORKLOADS[@]}"; do
      alloc_workload "$workload"
      summary="round $round/$runs, $workload:"
      for name in "${order[@]}"; do
        alloc_run line "$name" "$workload" "$work/out.txt" "round $round"
        same=0
        cmp -s "$work/$workload.glibc.out" "$work/out.txt" && same=1
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$workload" "$name" \
          "$(bench_field "$line" cpu_us)" "$(bench_field "$line" user_us)" "$(bench_field "$line" sys_us)" \
          "$(bench_field "$line" wall_us)" "$(bench_field "$line" maxrss_kb)" "$(bench_field "$line" status)" \
          "$same" >>"$runs_tsv"
        summary+=" $name $(alloc_outcome "$line" "$work/out.txt" "$workload")"
      done
      bench_log "  $summary ($(bench_elapsed "$start") in all)"
    done
  done

  bench_log "suite alloc: one run per workload under hotpool auto with its JSON report, for the pool share"
  printf 'workload\tdescription\tallocations\tpool_hits\tnote\n' >"$workloads_tsv"
  local counts allocations hits note
  for workload in "${ALLOC_WORKLOADS[@]}"; do
    alloc_workload "$workload"
    allocations="" hits="" note=""
    if [[ " ${allocators[*]} " == *" hotpool-auto "* ]]; then
      local reports=$work/reports/$workload
      mkdir -p "$reports"
      local -a options=(--preload "$BENCH_LIBRARY" --env HOTPOOL_MODE=auto --env "HOTPOOL_OUTPUT=$reports/report-%p.json")
      alloc_run line hotpool-auto "$workload" "$work/out.txt" "report run" "${options[@]}"
      if [[ $(bench_field "$line" status) != 0 ]]; then
        note="the report run failed"
      else
        cmp -s "$work/$workload.glibc.out" "$work/out.txt" || note="output differs"
        counts=$(/usr/bin/python3 "$BENCH_ROOT/bench/tools/tables.py" pool-share "$reports") || note="no report"
        read -r allocations hits <<<"$counts"
      fi
      bench_log "  $workload: ${hits:-?} of ${allocations:-?} allocations from pools${note:+ ($note)}"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$workload" "$(alloc_workload_describe "$workload")" "$allocations" "$hits" \
      "$note" >>"$workloads_tsv"
  done

  local -a labels=()
  for name in "${allocators[@]}"; do labels+=("$name=$(bench_allocator_label "$name")"); done
  local plot_script=$work/alloc.gp plot_file=$BENCH_RESULTS/alloc.svg
  mkdir -p "$BENCH_RESULTS"
  {
    printf '## alloc: whole programs under each allocator\n\n'
    printf 'Runs: %d timed round(s) after one untimed round; per round each workload runs under every allocator, in an order rotated by one each round. Times are the child'"'"'s CPU time (user+sys, wait4, children included); hotpool runs with HOTPOOL_REPORT=off. Allocators other than glibc are preloaded (LD_PRELOAD, inherited by child processes).  \n' "$runs"
    printf 'Machine: %s\n\n' "$(bench_environment)"
    /usr/bin/python3 "$BENCH_ROOT/bench/tools/tables.py" alloc "$runs_tsv" "$workloads_tsv" "$plot_script" \
      "${plot_file#"$BENCH_ROOT"/}" "${labels[@]}"
    if ((${#ALLOC_FAILURES[@]} == 0)); then
      printf 'Outputs: every run of every allocator wrote byte-identical stdout to glibc'"'"'s.  \n'
    else
      printf '**Failures** (each with the command that reproduces it):\n\n'
      printf -- '- %s\n' "${ALLOC_FAILURES[@]}"
      printf '\n'
    fi
    printf 'Plot: %s. Raw runs: %s.\n' "${plot_note:-${plot_file#"$BENCH_ROOT"/}}" "${runs_tsv#"$BENCH_ROOT"/}"
  } | bench_save alloc.md
  if [[ -z $plot_note ]]; then
    (cd "$BENCH_ROOT" && gnuplot "$plot_script") || bench_log "suite alloc: gnuplot failed; no plot"
    [[ -s $plot_file ]] && bench_log "saved ${plot_file#"$BENCH_ROOT"/}"
  fi

  ((${#ALLOC_FAILURES[@]} == 0)) || bench_die "suite alloc: ${#ALLOC_FAILURES[@]} failed or differing runs (listed above)"
}

# alloc_run VAR ALLOCATOR WORKLOAD STDOUT WHAT [STOPWATCH OPTIONS...]: one run
# of the workload set up by alloc_workload, under ALLOCATOR (or, with
# options given, under exactly those). A failure is added to ALLOC_FAILURES.
alloc_run() {
  local -n _run_line=$1
  local allocator=$2 workload=$3 output=$4 what=$5
  shift 5
  local -a options=("$@")
  ((${#options[@]})) || bench_allocator_options options "$allocator"
  local errors=$BENCH_DATA/alloc/stderr.txt
  bench_try _run_line "$errors" "${options[@]}" "${ALLOC_OPTIONS[@]}" --stdout "$output" -- "${ALLOC_PROGRAM[@]}"
  local status
  status=$(bench_field "$_run_line" status)
  if [[ $status != 0 ]]; then
    ALLOC_FAILURES+=("$workload under $allocator ($what): $(bench_status_text "$status"), stderr: \`$(tail -n 2 "$errors" | tr '\n' ' ' | cut -c 1-300)\`; command: \`$(bench_shell_command "${options[@]}" "${ALLOC_OPTIONS[@]}" -- "${ALLOC_PROGRAM[@]}")\`")
    cp "$errors" "$BENCH_DATA/alloc/$workload.$allocator.stderr"
  elif [[ $allocator != glibc && -f $BENCH_DATA/alloc/$workload.glibc.out ]] &&
       ! cmp -s "$BENCH_DATA/alloc/$workload.glibc.out" "$output"; then
    ALLOC_FAILURES+=("$workload under $allocator ($what): stdout differs from glibc's ($(cmp "$BENCH_DATA/alloc/$workload.glibc.out" "$output" 2>&1 | head -n 1)); command: \`$(bench_shell_command "${options[@]}" "${ALLOC_OPTIONS[@]}" -- "${ALLOC_PROGRAM[@]}")\`")
  fi
}

# alloc_outcome LINE STDOUT WORKLOAD: a run's CPU time for the progress
# lines, or what went wrong.
alloc_outcome() {
  local status
  status=$(bench_field "$1" status)
  if [[ $status != 0 ]]; then printf 'FAILED (%s)\n' "$(bench_status_text "$status")"
  elif ! cmp -s "$BENCH_DATA/alloc/$3.glibc.out" "$2"; then printf 'OUTPUT DIFFERS\n'
  else bench_seconds "$(bench_field "$1" cpu_us)"
  fi
}
