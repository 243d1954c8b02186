#!/usr/bin/env bash
# convert: qcow2dedup against qemu-img convert -O qcow2 on the corpus, at the
# same cluster size, alternating runs, page cache dropped before each.
#
# Two pairings, each with the same durability on both sides:
#   writeback  ours by default (syncs in crash-safe order and at the end)
#              against qemu-img -t writeback (flushes at close);
#   unsafe     ours with -t unsafe against qemu-img convert's default
#              cache mode, unsafe (no sync at all).
# Then the read side, our dedup image back to raw by each tool, in the same
# pairings. Prints medians, CPU seconds per GiB of input, their ratio,
# output sizes and peak RSS; then the memory the dedup index costs per
# stored cluster.
source "$(dirname "$0")/lib.sh"
disk=$corpus/vmfarm.raw
small=$corpus/vm-a.raw
# cpu/GiB: median CPU seconds (user + sys) per GiB of input (the raw file's
# size; for the raw export, the image's virtual size).
in_bytes=$(stat -c %s "$disk")
printf '%-8s %-10s %9s %9s %9s %9s %7s %12s %12s %9s %9s\n' cluster cache median_s cpu/GiB qemu_s q_cpu/GiB \
  ratio out_bytes qemu_bytes rss_kib qemu_rss
# row CLUSTER CACHE OURS_OUT QEMU_OUT INPUT_BYTES: one line from $work/ours.times and $work/qemu.times
row() {
  local ours_t qemu_t
  ours_t=$(median "$work/ours.times" 1); qemu_t=$(median "$work/qemu.times" 1)
  printf '%-8s %-10s %9.2f %9s %9.2f %9s %7.2f %12d %12d %9d %9d\n' "$1" "$2" "$ours_t" \
    "$(cpu_per_gib "$work/ours.times" "$5")" "$qemu_t" "$(cpu_per_gib "$work/qemu.times" "$5")" \
    "$(echo "$ours_t / $qemu_t" | bc -l)" "$(stat -c %s "$3")" "$(stat -c %s "$4")" \
    "$(median "$work/ours.times" 2)" "$(median "$work/qemu.times" 2)"
}
for cs in 64K 4K; do
  for cache in writeback unsafe; do
    rm -f "$work"/*.times
    # Both outputs are removed before their run, so neither pays for
    # dropping the last run's file inside its timing.
    for i in $(seq "$runs"); do
      rm -f "$work/ours.qcow2"
      measure "$work/ours" "$bin" convert -t $cache -o cluster_size=$cs "$disk" "$work/ours.qcow2"
      rm -f "$work/qemu.qcow2"
      measure "$work/qemu" qemu-img convert -t $cache -O qcow2 -o cluster_size=$cs "$disk" "$work/qemu.qcow2"
    done
    row "$cs" $cache "$work/ours.qcow2" "$work/qemu.qcow2" "$in_bytes"
    qemu-img check -q "$work/ours.qcow2" || echo "WARNING: qemu-img check failed on our output" >&2
    qemu-img compare -q "$disk" "$work/ours.qcow2" || echo "WARNING: our output differs from $disk" >&2
  done
  mv "$work/ours.qcow2" "$work/dedup-$cs.qcow2"
done

# The read side: our dedup image back to raw, by each tool (the same image,
# the same pairings of cache modes; the outputs are sparse raw files).
for cs in 64K 4K; do
  img=$work/dedup-$cs.qcow2
  for cache in writeback unsafe; do
    rm -f "$work"/*.times
    for i in $(seq "$runs"); do
      rm -f "$work/ours.raw"
      measure "$work/ours" "$bin" convert -t $cache -O raw "$img" "$work/ours.raw"
      rm -f "$work/qemu.raw"
      measure "$work/qemu" qemu-img convert -t $cache -O raw "$img" "$work/qemu.raw"
    done
    row "$cs>raw" $cache "$work/ours.raw" "$work/qemu.raw" "$in_bytes"
    cmp -s "$work/ours.raw" "$work/qemu.raw" || echo "WARNING: the two raw exports of $img differ" >&2
  done
  rm -f "$img" "$work/ours.raw" "$work/qemu.raw"
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
    rm -f "$work/$input.qcow2"
    measure "$work/$input" "$bin" convert -o cluster_size=4K "${!input}" "$work/$input.qcow2"
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
printf 'RSS growth per stored cluster: ours %.1f B, qemu-img %.1f B; index (ours - qemu-img): %.1f B (target <= 16, issue 13)\n' \
  "$(per $((r_big - r_small)))" "$(per $((q_big - q_small)))" "$(per $(((r_big - r_small) - (q_big - q_small))))"
