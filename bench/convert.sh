#!/usr/bin/env bash
# convert: qcow2dedup against qemu-img convert -O qcow2 on the corpus, at the
# same cluster size, alternating runs, page cache dropped before each.
#
# Two pairings, each with the same durability on both sides:
#   writeback  ours by default (syncs in crash-safe order and at the end)
#              against qemu-img -t writeback (flushes at close);
#   unsafe     ours with -t unsafe against qemu-img convert's default
#              cache mode, unsafe (no sync at all).
# Prints medians, their ratio, output sizes and peak RSS; then the memory the
# dedup index costs per stored cluster.
source "$(dirname "$0")/lib.sh"
disk=$corpus/vmfarm.raw
small=$corpus/vm-a.raw
printf '%-8s %-10s %9s %9s %7s %12s %12s %9s %9s\n' cluster cache median_s qemu_s ratio out_bytes qemu_bytes rss_kib qemu_rss
for cs in 64K 4K; do
  for cache in writeback unsafe; do
    rm -f "$work"/*.times
    for i in $(seq "$runs"); do
      measure "$work/ours" "$bin" convert --force -t $cache -o cluster_size=$cs "$disk" "$work/ours.qcow2"
      rm -f "$work/qemu.qcow2"
      measure "$work/qemu" qemu-img convert -t $cache -O qcow2 -o cluster_size=$cs "$disk" "$work/qemu.qcow2"
    done
    ours_t=$(median "$work/ours.times" 1); qemu_t=$(median "$work/qemu.times" 1)
    ours_m=$(median "$work/ours.times" 2); qemu_m=$(median "$work/qemu.times" 2)
    printf '%-8s %-10s %9.2f %9.2f %7.2f %12d %12d %9d %9d\n' "$cs" $cache "$ours_t" "$qemu_t" \
      "$(echo "$ours_t / $qemu_t" | bc -l)" "$(stat -c %s "$work/ours.qcow2")" "$(stat -c %s "$work/qemu.qcow2")" \
      "$ours_m" "$qemu_m"
    qemu-img check -q "$work/ours.qcow2" || echo "WARNING: qemu-img check failed on our output" >&2
    qemu-img compare -q "$disk" "$work/ours.qcow2" || echo "WARNING: our output differs from $disk" >&2
  done
done

# Index memory: peak RSS growth per stored cluster added, from a small input
# to a large one, both at 4K (where the index is largest). The small input is
# padded with a hole to the large one's virtual size. The L2 tables still
# grow with the guest area that holds data, as they do in qemu-img, so the
# dedup index's share is our growth minus qemu-img's growth on the same pair.
cp --sparse=always "$small" "$work/small.raw"
truncate -s "$(stat -c %s "$disk")" "$work/small.raw"
small=$work/small.raw
for input in small disk; do
  rm -f "$work/$input.times" "$work/q$input.times"
  for i in $(seq "$runs"); do
    measure "$work/$input" "$bin" convert --force -o cluster_size=4K "${!input}" "$work/$input.qcow2"
    rm -f "$work/q.qcow2"
    measure "$work/q$input" qemu-img convert -O qcow2 -o cluster_size=4K "${!input}" "$work/q.qcow2"
  done
  stored=$("$bin" info --output=json "$work/$input.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dedup"]["stored-clusters"])')
  echo "$stored $(median "$work/$input.times" 2) $(median "$work/q$input.times" 2)" >"$work/$input.mem"
done
read s_small r_small q_small <"$work/small.mem"; read s_big r_big q_big <"$work/disk.mem"
per() { echo "$1 * 1024 / ($s_big - $s_small)" | bc -l; }
printf 'memory: %d -> %d stored clusters; peak RSS %d -> %d KiB (qemu-img %d -> %d KiB)\n' \
  "$s_small" "$s_big" "$r_small" "$r_big" "$q_small" "$q_big"
printf 'RSS growth per stored cluster: ours %.1f B, qemu-img %.1f B; index (ours - qemu-img): %.1f B (target <= 40)\n' \
  "$(per $((r_big - r_small)))" "$(per $((q_big - q_small)))" "$(per $(((r_big - r_small) - (q_big - q_small))))"
