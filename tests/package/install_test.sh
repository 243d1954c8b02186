#!/usr/bin/env bash
# The library as a package: `cmake --install` into a fresh prefix, then
# examples/stats_example.cpp built against that installation, both ways a
# user would (find_package, pkg-config), and run on an image of known
# content. Also: every installed public header compiles on its own, with
# nothing but the prefix's include directory (no private lib/src header).
#
#   install_test.sh BUILD_DIR SOURCE_DIR [CXX [FLAGS]]
#
# CXX (default c++) compiles the example; FLAGS (default none) go to its
# compile and link, e.g. the sanitizer flags the library was built with.
set -euo pipefail
build=$(cd "$1" && pwd) src=$(cd "$2" && pwd) cxx=${3:-c++} flags=${4:-}
for tool in cmake pkg-config "$cxx"; do
  command -v "$tool" >/dev/null || { echo "FAIL: $tool is missing" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
fail() { echo "FAIL: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" >/dev/null
pc=$(find "$prefix" -name qcow2dedup.pc)
config=$(find "$prefix" -name qcow2dedupConfig.cmake)
[ -n "$pc" ] || fail "no qcow2dedup.pc installed"
[ -n "$config" ] || fail "no qcow2dedupConfig.cmake installed"
libdir=$(dirname "$(dirname "$pc")")
[ -e "$libdir/libqcow2dedup.so" ] || fail "no libqcow2dedup.so in $libdir"
for h in image.h stats.h status.h file.h version.h; do
  [ -f "$prefix/include/qcow2dedup/$h" ] || fail "qcow2dedup/$h is not installed"
done
[ -z "$(find "$prefix/include" -name '*.in')" ] || fail "a template was installed among the headers"

# Each header alone, and the version agrees with the project's.
for h in "$prefix"/include/qcow2dedup/*.h; do
  echo "#include <qcow2dedup/$(basename "$h")>" >"$work/one.cpp"
  "$cxx" -std=c++20 -fsyntax-only -I"$prefix/include" "$work/one.cpp" || fail "$(basename "$h") does not compile alone"
done
version=$(sed -n 's/^project(qcow2dedup VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
[ -n "$version" ] || fail "no version in CMakeLists.txt"
[ "$(PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --modversion qcow2dedup)" = "$version" ] ||
  fail "qcow2dedup.pc's version is not $version"

# An image of known content: 8 clusters of 64 KiB, four of 0x11, two of
# 0x22, two zero: 6 with data, 2 stored, ratio 3.00, 4 x 64 KiB saved.
fill() { head -c 65536 /dev/zero | tr '\0' "$1"; }
{ fill '\021'; fill '\021'; fill '\042'; head -c 65536 /dev/zero; fill '\021'; fill '\042'; fill '\021';
  head -c 65536 /dev/zero; } >"$work/disk.raw"
"$prefix/bin/qcow2dedup" convert -q "$work/disk.raw" "$work/disk.qcow2"
qemu-img check -q "$work/disk.qcow2" || fail "qemu-img check finds the example's image unclean"
expected="qcow2dedup library $version
$work/disk.qcow2: 8 guest clusters of 65536 bytes, 6 with data, stored in 2 (dedup ratio 3.00)
saved: 262144 bytes"

check_example() {  # binary, how it was built
  libs=$(ldd "$1")  # not piped into grep -q: its early exit would fail ldd under pipefail
  grep -q "$libdir/libqcow2dedup.so" <<<"$libs" || fail "$2: the example does not load the installed library"
  out=$("$1" "$work/disk.qcow2") || fail "$2: the example failed"
  [ "$out" = "$expected" ] || fail "$2: the example printed
$out
instead of
$expected"
  "$1" "$work/missing.qcow2" 2>"$work/err" && fail "$2: a missing image did not fail"
  grep -q "missing.qcow2" "$work/err" || fail "$2: the error does not name the image"
  echo "ok: $2"
}

cmake -S "$src/examples" -B "$work/examples" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$work/examples" >/dev/null
check_example "$work/examples/stats_example" "find_package(qcow2dedup)"

# shellcheck disable=SC2046,SC2086  # pkg-config's words and the flags are meant to split
"$cxx" -std=c++20 $flags "$src/examples/stats_example.cpp" -o "$work/stats_example_pc" \
  $(PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --cflags --libs qcow2dedup) -Wl,-rpath,"$libdir"
check_example "$work/stats_example_pc" "pkg-config qcow2dedup"
