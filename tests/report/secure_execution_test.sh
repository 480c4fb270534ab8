#!/usr/bin/env bash
# A secure-execution process (AT_SECURE: here a set-user-ID program run by
# another user) writes no report file: hotpool sends its report to stderr
# instead, with one line saying so. glibc preloads into such a process only
# a library named without a slash, found in a standard directory, with its
# set-user-ID bit on: the test installs a copy of libhotpool.so so for the
# run and removes it after. Needs root (exit 77: skipped).
#   secure_execution_test.sh LIBHOTPOOL REPORT_PROGRAM
set -uo pipefail
library=$1 program=$2
if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
  echo "skipped: needs root and setpriv"
  exit 77
fi
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
system_dir=/usr/lib/$multiarch
name=libhotpool-secure-execution-test-$$.so
work=$(mktemp -d /tmp/hotpool-secure-execution.XXXXXX)
trap 'rm -f "$system_dir/$name"; rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -m 1777 "$work/out"
install -m 4755 "$library" "$system_dir/$name"
install -m 4755 -o root "$program" "$work/program"

setpriv --reuid=65534 --regid=65534 --clear-groups \
  env LD_PRELOAD="$name" HOTPOOL_MODE=profile HOTPOOL_OUTPUT="$work/out/report.json" \
  "$work/program" known >"$work/stdout" 2>"$work/stderr"
status=$?

failed=0
fail() { echo "FAILED: $*"; failed=1; }
[ "$status" = 0 ] || fail "the program exited with $status"
grep -q '^hotpool: secure-execution process' "$work/stderr" || fail "no line saying the report goes to stderr"
grep -q '^hotpool: pid ' "$work/stderr" || fail "no report on stderr (was hotpool loaded at all?)"
files=$(find "$work/out" -type f | wc -l)
[ "$files" = 0 ] || fail "$files file(s) written: $(find "$work/out" -type f)"
if [ "$failed" != 0 ]; then
  echo "--- stderr"; head -20 "$work/stderr"
  exit 1
fi
echo "secure execution: no file written, report on stderr"
