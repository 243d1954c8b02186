#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a
# bounded time on a seed corpus of real images made by qemu-img and us.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
CC=clang CXX=clang++ bash .ci/build.sh build-fuzz -DQCOW2DEDUP_FUZZ=ON >/dev/null
seeds=build-fuzz/seeds; rm -rf "$seeds"; mkdir -p "$seeds"
bin=build/apps/qcow2dedup
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
if [ -x "$bin" ]; then
  "$bin" create -q -o cluster_size=512 "$t/d.qcow2" 64K
  "$bin" write -q --pattern 7 --length 4096 "$t/d.qcow2" 0
  "$bin" write -q --pattern 7 --length 4096 "$t/d.qcow2" 8192
  seed "$t/d.qcow2"
fi
total=0
for f in build-fuzz/tests/*_fuzz; do
  name=$(basename "$f")
  mkdir -p "build-fuzz/corpus-$name"
  echo "fuzz: $name for ${secs}s" >&2
  "$f" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -max_len=65536 -print_final_stats=1 \
    "build-fuzz/corpus-$name" "$seeds" 2>"build-fuzz/$name.log" || { tail -50 "build-fuzz/$name.log"; exit 1; }
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "build-fuzz/$name.log")
  echo "fuzz: $name: $runs executions, no crash" >&2
  total=$((total + runs))
done
echo "fuzz: $total executions in all"
