#!/usr/bin/env bash
# check: qcow2dedup check against qemu-img check on the same dedup image
# (the corpus's VM-farm disk converted by qcow2dedup, at 64K and at 4K
# clusters), alternating runs: "cold" with the page cache dropped before
# each, "warm" with the image in the page cache. Prints the medians, the
# ratio and the peak RSS; then the hash pass's throughput beside what this
# machine's SHA-256 can do (openssl speed at the cluster size, times the
# threads our check hashes on). Cold, the hash pass mostly measures the
# disk: qemu-img reads only metadata, we read every stored cluster.
#
# The two sides do different work: both walk all metadata and count
# references; ours then reads and hashes every stored data cluster (on
# HashThreads() = min(8, cores) threads, lib/src/dedup/hasher.h) and
# compares with the dedup index. Our check does not report the hash pass's
# own time, so its throughput is an estimate: stored bytes / (our time -
# qemu-img's time). The difference holds everything else our check does
# more slowly or faster than QEMU's, so it is a bound of sorts, not a
# measurement; the columns say "est".
source "$(dirname "$0")/lib.sh"
disk=$corpus/vmfarm.raw
cores=$(getconf _NPROCESSORS_ONLN)
threads=$(( cores < 8 ? cores : 8 ))

# lib.sh's measure, without dropping the page cache first.
measure_warm() {
  local out=$1; shift
  /usr/bin/time -f '%e %M' -o "$work/.t" "$@" >/dev/null
  cat "$work/.t" >>"$out.times"
}

# SHA-256 bytes per second on one core for blocks of $1 bytes.
sha256_speed() {
  openssl speed -mr -seconds "${SHA_SECONDS:-3}" -bytes "$1" -evp sha256 2>/dev/null |
    awk -F: '/^\+F:/ {print $4}'
}

printf '%-8s %-5s %-10s %9s %9s %7s %9s %9s\n' cluster cache tool median_s qemu_s ratio rss_kib qemu_rss
declare -A stored_bytes ours_s qemu_s
for cs in 64K 4K; do
  img=$work/vmfarm-$cs.qcow2
  "$bin" convert --force -q -o cluster_size=$cs "$disk" "$img"
  # Both must find it clean: an exit code other than 0 would stop measure.
  "$bin" check -q "$img" || { echo "bench: qcow2dedup check fails on $img" >&2; exit 1; }
  qemu-img check -q "$img" || { echo "bench: qemu-img check fails on $img" >&2; exit 1; }
  rm -f "$work"/*.times
  for i in $(seq "$runs"); do
    measure "$work/ours-cold" "$bin" check "$img"
    measure "$work/qemu-cold" qemu-img check "$img"
  done
  "$bin" check -q "$img"  # reads every stored cluster: the image is in the page cache now
  for i in $(seq "$runs"); do
    measure_warm "$work/ours-warm" "$bin" check "$img"
    measure_warm "$work/qemu-warm" qemu-img check "$img"
  done
  for cache in cold warm; do
    ours_t=$(median "$work/ours-$cache.times" 1); qemu_t=$(median "$work/qemu-$cache.times" 1)
    ours_m=$(median "$work/ours-$cache.times" 2); qemu_m=$(median "$work/qemu-$cache.times" 2)
    # /usr/bin/time counts hundredths: a warm qemu-img check may take "0.00".
    ratio=$(awk -v a="$ours_t" -v b="$qemu_t" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    printf '%-8s %-5s %-10s %9.2f %9.2f %7s %9d %9d\n' "$cs" $cache qcow2dedup "$ours_t" "$qemu_t" "$ratio" \
      "$ours_m" "$qemu_m"
    ours_s[$cs-$cache]=$ours_t
    qemu_s[$cs-$cache]=$qemu_t
  done
  stored=$("$bin" check --output=json "$img" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["dedup"]["stored-clusters"])')
  stored_bytes[$cs]=$(( stored * ${cs%K} * 1024 ))
done

# The hash pass beside SHA-256 at the same block size on as many threads.
echo
printf '%-8s %-5s %12s %9s %12s %12s %8s %12s %9s\n' cluster cache hashed_bytes est_s est_MiB/s sha_MiB/s \
  threads ceil_MiB/s of_ceil
for cs in 64K 4K; do
  one=$(sha256_speed $(( ${cs%K} * 1024 )))
  for cache in cold warm; do
    python3 - "$cs" $cache "${stored_bytes[$cs]}" "${ours_s[$cs-$cache]}" "${qemu_s[$cs-$cache]}" "$one" \
      "$threads" <<'EOF'
import sys
cs, cache, hashed, ours, qemu, one, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), \
    float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
mib = 1024 * 1024
ceiling = one * threads
est = ours - qemu
head = f"{cs:<8} {cache:<5} {hashed:>12}"
if est > 0:
    rate = hashed / est
    print(f"{head} {est:>9.2f} {rate / mib:>12.1f} {one / mib:>12.1f} {threads:>8} {ceiling / mib:>12.1f} "
          f"{rate / ceiling:>8.0%}")
else:
    print(f"{head} {'n/a':>9} {'n/a':>12} {one / mib:>12.1f} {threads:>8} {ceiling / mib:>12.1f} {'n/a':>8}"
          "  (our check was not slower than qemu-img's: no estimate)")
EOF
  done
done
echo "est_s = our check - qemu-img check (medians): an estimate of the hash pass, not a measurement;"
echo "ceil = openssl speed -evp sha256 -bytes <cluster size> on one core x $threads hash threads ($cores cores online)"
