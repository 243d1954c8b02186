#!/usr/bin/env bash
# Installs, builds, and deduplicates a built-in example disk: four "VMs" that
# share most of their data, converted into one dedup image that stock QEMU
# then checks and compares.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
bash .ci/build.sh build
bin=build/apps/qcow2dedup
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 - "$work/disk.raw" <<'PY'
import random, sys
random.seed(7)
base = bytes(random.getrandbits(8) for _ in range(4 << 20))  # a 4 MiB "OS"
with open(sys.argv[1], "wb") as f:
    for vm in range(4):                                         # four clones
        f.write(base)
        f.write(bytes(random.getrandbits(8) for _ in range(256 << 10)))  # own data
        f.write(bytes(1 << 20))                                 # free space
PY
echo "== qcow2dedup convert -p disk.raw disk.qcow2"
"$bin" convert -p "$work/disk.raw" "$work/disk.qcow2"
echo "== qcow2dedup dedup-stats disk.qcow2"
"$bin" dedup-stats "$work/disk.qcow2"
echo "== qemu-img check disk.qcow2 (stock QEMU judges)"
qemu-img check "$work/disk.qcow2"
qemu-img compare "$work/disk.qcow2" "$work/disk.raw"
ls -ls "$work/disk.raw" "$work/disk.qcow2"
