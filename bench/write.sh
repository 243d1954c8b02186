#!/usr/bin/env bash
# One small write: `qcow2dedup write` of 4 KiB against `qemu-io -c 'write'`
# of 4 KiB into the same image, warm page cache, alternating, RUNS times,
# medians. Two images at 4K clusters: the vmfarm corpus converted (1x), and
# one with about 10x as many stored clusters (the corpus plus fresh random
# data at distinct offsets). qemu-io writes its own copy of each image (a
# write by QEMU makes our next open rebuild the index, which is not what
# is measured here).
#
# Four kinds of write, each a fresh session, each run at a guest cluster of
# its own (see pick_offsets):
#   fresh   new random data over a guest cluster of unique data
#   dup     data the image already stores, over an unallocated cluster (a link)
#   shared  new random data over a guest cluster whose data is stored once
#           for three or more guest clusters (a reference dropped)
#   last    the same over one of exactly two: the other entry's COPIED flag
#           must be set again, and finding it takes a pass over the L2
#           tables (issue 13: not yet bounded)
# Targets (issue 13): ours <= 2x qemu-io on the 1x image, and the 10x image
# within 1.5x of the 1x figure.
source "$(dirname "$0")/lib.sh"
big_extra=${BIG_EXTRA_GIB:-5}  # GiB of fresh random data in the 10x image

# measure_warm OUT_PREFIX CMD...: appends CMD's wall seconds (microsecond
# resolution: /usr/bin/time's 10 ms is too coarse here) to OUT_PREFIX.times;
# the page cache stays warm.
measure_warm() {
  local out=$1; shift
  local t0=$EPOCHREALTIME
  "$@" >/dev/null
  echo "$EPOCHREALTIME - $t0" | bc -l >>"$out.times"
}

# pick_offsets IMAGE KIND N: N guest offsets (>= 64 MiB, one per host
# cluster, so that no run's write changes what the next run meets), from
# qemu-img map:
#   fresh  a guest cluster whose host cluster no other guest cluster uses
#   shared one of three or more that share a host cluster (3+ -> 2+ references)
#   last   one of exactly two (2 -> 1: the other entry must get COPIED back)
#   hole   an unallocated guest cluster
pick_offsets() {
  python3 - "$@" <<'EOF'
import json, subprocess, sys, collections
img, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", img]))
refs = collections.Counter()
runs = [e for e in m if e.get("data") and "offset" in e]
for e in runs:
    for k in range(e["length"] // 4096):
        refs[e["offset"] + k * 4096] += 1
want = {"fresh": lambda r: r == 1, "shared": lambda r: r >= 3, "last": lambda r: r == 2}
out, used = [], set()
if kind == "hole":
    for e in m:
        if not e.get("data") and e["length"] >= 1 << 20 and e["start"] >= (64 << 20):
            out = [e["start"] + i * 4096 for i in range(n)]; break
else:
    for e in runs:
        for k in range(e["length"] // 4096):
            g, h = e["start"] + k * 4096, e["offset"] + k * 4096
            if g >= (64 << 20) and h not in used and want[kind](refs[h]) and len(out) < n:
                out.append(g); used.add(h)
if len(out) < n:
    sys.exit(f"{img}: only {len(out)} guest clusters of kind {kind}")
print(" ".join(map(str, out)))
EOF
}

one=$work/one.qcow2 big=$work/big.qcow2
"$bin" convert -q --force -t unsafe -o cluster_size=4K "$corpus/vmfarm.raw" "$one"
cp --sparse=always "$corpus/vmfarm.raw" "$work/big.raw"
vsize=$(( $(stat -c %s "$corpus/vmfarm.raw") + (big_extra + 1) * 1024 * 1024 * 1024 ))
truncate -s "$vsize" "$work/big.raw"
head -c "$((big_extra * 1024 * 1024 * 1024))" /dev/urandom |
  dd of="$work/big.raw" bs=4M seek="$(stat -c %s "$corpus/vmfarm.raw")" oflag=seek_bytes conv=notrunc status=none
"$bin" convert -q --force -t unsafe -o cluster_size=4K "$work/big.raw" "$big"
rm -f "$work/big.raw"
# Data the images already store, from a guest cluster of the corpus.
read -r f0 _ <<<"$(pick_offsets "$one" fresh 1)"
dd if="$corpus/vmfarm.raw" of="$work/dup.bin" bs=4096 skip=$((f0 / 4096)) count=1 status=none

printf '%-6s %-7s %14s %10s %10s %7s\n' image write stored_clusters ours_ms qemu_ms ratio
declare -A ours_ms
for name in one big; do
  img=${!name}
  cp --sparse=always "$img" "$work/q.qcow2"
  # The copy (6 GB for the 10x image) leaves dirty pages the kernel writes
  # back for seconds: each write's flushes would wait behind them.
  sync
  stored=$("$bin" info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dedup"]["stored-clusters"])')
  for kind in fresh dup shared last; do
    rm -f "$work/o.times" "$work/q.times"
    read -r -a at <<<"$(pick_offsets "$img" "$([ $kind = dup ] && echo hole || echo $kind)" "$runs")"
    for ((i = 0; i < runs; i++)); do
      if [ $kind = dup ]; then cp "$work/dup.bin" "$work/in.bin"; else head -c 4096 /dev/urandom >"$work/in.bin"; fi
      measure_warm "$work/o" "$bin" write -q --input "$work/in.bin" "$img" "${at[i]}"
      measure_warm "$work/q" qemu-io -c "write -P $((i + 1)) ${at[i]} 4k" "$work/q.qcow2"
    done
    o=$(median "$work/o.times" 1) q=$(median "$work/q.times" 1)
    ours_ms[$name.$kind]=$(echo "$o * 1000" | bc -l)
    printf '%-6s %-7s %14d %10.1f %10.1f %7.2f\n' "$name" "$kind" "$stored" "$(echo "$o * 1000" | bc -l)" \
      "$(echo "$q * 1000" | bc -l)" "$(echo "$o / $q" | bc -l)"
  done
  qemu-img check -q "$img" || echo "WARNING: qemu-img check failed on $img" >&2
  "$bin" check -q "$img" || echo "WARNING: our check failed on $img" >&2
done
for kind in fresh dup shared last; do
  printf 'size growth (10x image / 1x image), %-6s: %.2f (target <= 1.5)\n' "$kind" \
    "$(echo "${ours_ms[big.$kind]} / ${ours_ms[one.$kind]}" | bc -l)"
done
