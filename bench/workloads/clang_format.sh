# The clang-format workload (sourced by scripts/bench): Debian's
# clang-format reformatting one large C++ file made of libstdc++ headers.
# It is malloc-heavy (millions of small, short-lived allocations: tokens,
# strings, vectors) and deterministic: same input, same output, so every
# run's output can be compared byte for byte.

CLANG_FORMAT=/usr/bin/clang-format

clang_format_require() {
  hotpool_install_packages clang-format
  [[ -x $CLANG_FORMAT ]] || bench_die "$CLANG_FORMAT is missing (Debian package clang-format)"
}

# clang_format_input KIB: prints the path of a C++ file of at least KIB KiB:
# whole libstdc++ headers from the newest /usr/include/c++/N/bits, in name
# order, concatenated until big enough. Cached under BENCH_DATA.
clang_format_input() {
  local kib=$1 headers version file
  headers=$(find /usr/include/c++ -mindepth 2 -maxdepth 2 -name bits -type d 2>/dev/null | sort -V | tail -n 1)
  [[ -n $headers ]] || bench_die "no libstdc++ headers under /usr/include/c++ (Debian package libstdc++-dev)"
  version=$(basename "$(dirname "$headers")")
  file=$BENCH_DATA/clang-format-libstdc++$version-${kib}k.cpp
  if [[ ! -s $file ]]; then
    local partial=$file.partial header
    : >"$partial"
    while read -r header; do
      cat "$headers/$header" >>"$partial"
      (($(stat -c %s "$partial") >= kib * 1024)) && break
    done < <(cd "$headers" && LC_ALL=C ls -- *.h *.tcc)
    (($(stat -c %s "$partial") >= kib * 1024)) || bench_die "the headers in $headers add up to less than $kib KiB"
    mv "$partial" "$file"
  fi
  printf '%s\n' "$file"
}

# clang_format_describe FILE: one line for the tables.
clang_format_describe() {
  local version
  version=$("$CLANG_FORMAT" --version | sed -n 's/.*clang-format version \([^ ]*\).*/\1/p')
  awk -v bytes="$(stat -c %s "$1")" -v lines="$(wc -l <"$1")" -v name="${1#"$BENCH_ROOT"/}" -v v="$version" \
    'BEGIN { printf "clang-format %s --style=LLVM on %s (%.2f MiB, %d lines of libstdc++ headers)\n", v, name, bytes / 1048576, lines }'
}

# clang_format_args FILE: the command line to measure (after the stopwatch's --).
clang_format_args() { printf '%s\n' "$CLANG_FORMAT" --style=LLVM "$1"; }
