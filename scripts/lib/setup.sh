# Shared by scripts/demo, scripts/test and scripts/bench: install missing
# Debian packages, configure with CMake, build. Source it; don't run it.

HOTPOOL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HOTPOOL_BUILD=${HOTPOOL_BUILD:-$HOTPOOL_ROOT/build}

# Packages the build and the tests need: libunwind's headers (found with
# pkg-config) and Boost.Stacktrace for the reporter; the real-binary tests
# run python3, sort, gzip, git, perl and sqlite3 from Debian, also with
# hotpool stacked on jemalloc (and python3 on mimalloc); the converter's
# test decodes pprof output with protoc's code.
HOTPOOL_PACKAGES=(cmake make g++ pkg-config libunwind-dev libboost-stacktrace-dev
                  libgtest-dev googletest nlohmann-json3-dev
                  python3 sqlite3 gzip git perl coreutils libjemalloc2 libmimalloc2.0
                  protobuf-compiler python3-protobuf)

hotpool_install_packages() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "hotpool: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

hotpool_build() {
  hotpool_install_packages "${HOTPOOL_PACKAGES[@]}"
  cmake -S "$HOTPOOL_ROOT" -B "$HOTPOOL_BUILD" -DCMAKE_BUILD_TYPE="${HOTPOOL_BUILD_TYPE:-RelWithDebInfo}" >/dev/null
  cmake --build "$HOTPOOL_BUILD" -j"$(nproc)" "$@"
}

# CPython's regression suite, which the cpython CTest tests run with and
# without hotpool (tests/cpython); a missing suite fails them.
HOTPOOL_CPYTHON_PACKAGES=(libpython3.11-testsuite)
# What scripts/torture needs besides HOTPOOL_PACKAGES: the CPython suite,
# stress-ng, jemalloc to stack on, clang with libFuzzer (libclang-rt).
HOTPOOL_TORTURE_PACKAGES=("${HOTPOOL_CPYTHON_PACKAGES[@]}" stress-ng libjemalloc2 clang libclang-rt-14-dev)
