#!/usr/bin/env bash
# compress: qcow2dedup convert -c against qemu-img convert -c -O qcow2 on the
# corpus (vmfarm.raw), the same compression type and cluster size on both
# sides, alternating runs, page cache dropped before each, RUNS times,
# medians. Both with -t writeback (ours by default; qemu-img flushes at close).
#
# Two cluster sizes: qemu-img's default 64K, and BEST (default 4K: the size
# `qcow2dedup dedup-stats --simulate -c` recommends for vmfarm.raw, where
# dedup gains far more than compression loses on small clusters). A last row
# per type sets ours at BEST against qemu-img at its default 64K (what each
# tool gives at its best). Prints output sizes, wall times and their ratios;
# the targets are size <= 0.75 and time <= 0.5.
source "$(dirname "$0")/lib.sh"
disk=$corpus/vmfarm.raw
best=${BEST:-4K}
printf '%-5s %-8s %9s %9s %7s %12s %12s %7s\n' type cluster median_s qemu_s t_ratio out_bytes qemu_bytes s_ratio
for type in zlib zstd; do
  for cs in 64K "$best"; do
    rm -f "$work"/*.times
    for i in $(seq "$runs"); do
      measure "$work/ours" "$bin" convert --force -c -o cluster_size=$cs,compression_type=$type "$disk" "$work/ours.qcow2"
      rm -f "$work/qemu.qcow2"
      measure "$work/qemu" qemu-img convert -c -t writeback -O qcow2 -o cluster_size=$cs,compression_type=$type \
        "$disk" "$work/qemu.qcow2"
    done
    ours_t=$(median "$work/ours.times" 1); qemu_t=$(median "$work/qemu.times" 1)
    ours_b=$(stat -c %s "$work/ours.qcow2"); qemu_b=$(stat -c %s "$work/qemu.qcow2")
    printf '%-5s %-8s %9.2f %9.2f %7.2f %12d %12d %7.2f\n' $type "$cs" "$ours_t" "$qemu_t" \
      "$(echo "$ours_t / $qemu_t" | bc -l)" "$ours_b" "$qemu_b" "$(echo "$ours_b / $qemu_b" | bc -l)"
    qemu-img check -q "$work/ours.qcow2" || echo "WARNING: qemu-img check failed on our output" >&2
    qemu-img compare -q "$disk" "$work/ours.qcow2" || echo "WARNING: our output differs from $disk" >&2
    echo "$ours_t $ours_b" >"$work/ours-$cs.row"; echo "$qemu_t $qemu_b" >"$work/qemu-$cs.row"
  done
  read ours_t ours_b <"$work/ours-$best.row"; read qemu_t qemu_b <"$work/qemu-64K.row"
  printf '%-5s %-8s %9.2f %9.2f %7.2f %12d %12d %7.2f\n' $type "$best/64K" "$ours_t" "$qemu_t" \
    "$(echo "$ours_t / $qemu_t" | bc -l)" "$ours_b" "$qemu_b" "$(echo "$ours_b / $qemu_b" | bc -l)"
done
