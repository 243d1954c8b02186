#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/*_fuzz.cpp) with clang, ASan and
# UBSan, makes a seed corpus of real images (qemu-img, qemu-io and our own
# binary, built here too) and runs each target for FUZZ_SECONDS (default 60).
# Needs only what .ci/install-deps.sh installs (clang, libclang-rt-14-dev,
# qemu-utils). Crash inputs land in $dir/artifacts-<target>/; the corpus each
# target grows is kept in $dir/corpus-<target>/ for the next run.
# Prints per target and in all how many inputs were executed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
dir=${FUZZ_BUILD_DIR:-build-fuzz}
targets=()
for src in tests/fuzz/*_fuzz.cpp; do targets+=("$(basename "$src" .cpp)"); done
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ -DQCOW2DEDUP_FUZZ=ON >/dev/null
cmake --build "$dir" -j"$(nproc)" --target qcow2dedup-cli "${targets[@]}" >"$dir/build.log" 2>&1 ||
  { tail -50 "$dir/build.log" >&2; echo "fuzz: the build failed" >&2; exit 1; }
seeds=$dir/seeds; rm -rf "$seeds"; mkdir -p "$seeds"
bin=$dir/apps/qcow2dedup
i=0
seed() { i=$((i + 1)); cp "$1" "$seeds/seed$i"; }
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT
for opts in "cluster_size=512" "cluster_size=512,refcount_bits=1" "cluster_size=512,refcount_bits=64" \
            "cluster_size=512,compat=0.10" "cluster_size=16384,extended_l2=on" "cluster_size=512,lazy_refcounts=on"; do
  qemu-img create -q -f qcow2 -o "$opts" "$t/img" 256K
  qemu-io -c 'write -P 0x11 0 3k' -c 'write -z 8k 1k' -c 'write -P 0x22 100k 2k' "$t/img" >/dev/null
  seed "$t/img"
done
qemu-img create -q -f qcow2 -o cluster_size=512 "$t/s.qcow2" 64K
qemu-io -c 'write -P 0x33 0 4k' "$t/s.qcow2" >/dev/null
qemu-img snapshot -c snap "$t/s.qcow2"; seed "$t/s.qcow2"
head -c 8192 /dev/urandom >"$t/r.raw"; dd if=/dev/zero bs=8192 count=1 >>"$t/r.raw" 2>/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=512 "$t/r.raw" "$t/c.qcow2"; seed "$t/c.qcow2"
qemu-img convert -c -O qcow2 -o cluster_size=512,compression_type=zstd "$t/r.raw" "$t/z.qcow2"; seed "$t/z.qcow2"
# Our own images: a dedup index, shared clusters (refcount 2).
"$bin" create -q -o cluster_size=512 "$t/d.qcow2" 64K
"$bin" write -q --pattern 7 --length 4096 "$t/d.qcow2" 0
"$bin" write -q --pattern 7 --length 4096 "$t/d.qcow2" 8192
seed "$t/d.qcow2"
"$bin" convert -q -o cluster_size=512,refcount_bits=4 "$t/r.raw" "$t/e.qcow2"
seed "$t/e.qcow2"
total=0
for name in "${targets[@]}"; do
  f=$dir/tests/$name
  mkdir -p "$dir/corpus-$name" "$dir/artifacts-$name"
  echo "fuzz: $name for ${secs}s" >&2
  "$f" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts-$name/" "$dir/corpus-$name" "$seeds" 2>"$dir/$name.log" ||
    { tail -80 "$dir/$name.log" >&2; echo "fuzz: $name FAILED (input in $dir/artifacts-$name/)" >&2; exit 1; }
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$dir/$name.log")
  echo "fuzz: $name: $runs executions, no crash" >&2
  total=$((total + runs))
done
echo "fuzz: $total executions in all (${#targets[@]} targets, ${secs}s each)"
