#!/usr/bin/env bash
# dedup in place against the old way, in one run: the vmfarm corpus as
# `qemu-img convert -O qcow2` writes it (no dedup), then (a) `qcow2dedup
# dedup` of a copy of that image, where it lies, and (b) `qcow2dedup convert`
# of the same image into a new file; alternating, page cache dropped before
# each run, RUNS times, medians. Prints wall time, peak RSS, the ratio
# dedup/convert (target <= 1.0), the bytes each leaves on disk, and the hash
# ceiling: the stored bytes over SHA-256 x cores (openssl speed), the least
# time any dedup of this image can take.
source "$(dirname "$0")/lib.sh"
sha256_speed() {
  openssl speed -mr -seconds "${SHA_SECONDS:-3}" -bytes "$1" -evp sha256 2>/dev/null |
    awk -F: '/^\+F:/ {print $4}'
}
threads=$(nproc)
printf '%-8s %10s %9s %10s %9s %8s %12s %12s %10s\n' cluster dedup_s rss_kib convert_s rss_kib ratio \
  dedup_du convert_du ceiling_s
for cs in 64K 4K; do
  bytes=$(( ${cs%K} * 1024 ))
  src=$work/qemu-$cs.qcow2
  qemu-img convert -O qcow2 -o cluster_size=$cs "$corpus/vmfarm.raw" "$src"
  rm -f "$work/d.times" "$work/c.times"
  for ((i = 0; i < runs; i++)); do
    cp --sparse=always "$src" "$work/d.qcow2"
    measure "$work/d" "$bin" dedup -q "$work/d.qcow2"
    rm -f "$work/c.qcow2"
    measure "$work/c" "$bin" convert -q -o cluster_size=$cs "$src" "$work/c.qcow2"
  done
  stored=$(du -B1 "$src" | cut -f1)
  one=$(sha256_speed "$bytes")
  python3 - "$cs" "$(median "$work/d.times" 1)" "$(median "$work/d.times" 2)" "$(median "$work/c.times" 1)" \
    "$(median "$work/c.times" 2)" "$(du -B1 "$work/d.qcow2" | cut -f1)" "$(du -B1 "$work/c.qcow2" | cut -f1)" \
    "$stored" "$one" "$threads" <<'PY'
import sys
cs, d, drss, c, crss, ddu, cdu, stored, one, threads = sys.argv[1:]
d, c = float(d), float(c)
ratio = f"{d / c:.2f}" if c > 0 else "n/a"
ceiling = float(stored) / (float(one) * int(threads))
print(f"{cs:<8} {d:>10.2f} {drss:>9} {c:>10.2f} {crss:>9} {ratio:>8} {ddu:>12} {cdu:>12} {ceiling:>10.2f}")
PY
done
