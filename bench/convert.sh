#!/usr/bin/env bash
# convert: qcow2dedup against qemu-img convert -O qcow2 on the corpus, at the
# same cluster size, alternating runs, page cache dropped before each.
# Prints medians, ratios, output sizes and peak RSS, and the dedup index's
# memory per stored cluster (RSS growth from a small to a large input).
source "$(dirname "$0")/lib.sh"
disk=$corpus/vmfarm.raw
small=$corpus/vm-a.raw
printf '%-8s %-10s %9s %9s %7s %12s %12s %9s %9s\n' cluster tool median_s qemu_s ratio out_bytes qemu_bytes rss_kib qemu_rss
for cs in 64K 4K; do
  rm -f "$work"/*.times
  for i in $(seq "$runs"); do
    measure "$work/ours" "$bin" convert --force -o cluster_size=$cs "$disk" "$work/ours.qcow2"
    measure "$work/qemu" qemu-img convert -O qcow2 -o cluster_size=$cs "$disk" "$work/qemu.qcow2"
  done
  ours_t=$(median "$work/ours.times" 1); qemu_t=$(median "$work/qemu.times" 1)
  ours_m=$(median "$work/ours.times" 2); qemu_m=$(median "$work/qemu.times" 2)
  printf '%-8s %-10s %9.2f %9.2f %7.2f %12d %12d %9d %9d\n' "$cs" qcow2dedup "$ours_t" "$qemu_t" \
    "$(echo "$ours_t / $qemu_t" | bc -l)" "$(stat -c %s "$work/ours.qcow2")" "$(stat -c %s "$work/qemu.qcow2")" \
    "$ours_m" "$qemu_m"
  qemu-img check -q "$work/ours.qcow2" || echo "WARNING: qemu-img check failed on our output" >&2
done

# Index memory: peak RSS growth between the small and the large input, per
# stored cluster added (both at 4K, where the index is largest).
for input in small disk; do
  rm -f "$work/$input.times"
  measure "$work/$input" "$bin" convert --force -o cluster_size=4K "${!input}" "$work/$input.qcow2"
  stored=$("$bin" info --output=json "$work/$input.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dedup"]["stored-clusters"])')
  echo "$stored $(median "$work/$input.times" 2)" >"$work/$input.mem"
done
read s_small r_small <"$work/small.mem"; read s_big r_big <"$work/disk.mem"
printf 'index memory: %d -> %d stored clusters, peak RSS %d -> %d KiB: %.1f bytes per stored cluster (target <= 40)\n' \
  "$s_small" "$s_big" "$r_small" "$r_big" "$(echo "($r_big - $r_small) * 1024 / ($s_big - $s_small)" | bc -l)"
