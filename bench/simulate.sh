#!/usr/bin/env bash
# simulate: dedup-stats --simulate at three cluster sizes against a single
# SHA-256 pass over the same file (sha256sum, and openssl dgst), on the
# corpus's sparse VM-farm disk; alternating runs, page cache dropped before
# each. Prints, per baseline, the medians, the ratio and the peak RSS; then
# what the simulation found (unique clusters per size), so that the row
# says what the time bought.
#
# The two sides do different work: the simulation skips the holes the file
# reports, hashes the data once at the smallest cluster size (on every
# core; a larger cluster's hash is the hash of its sub-clusters' digests)
# and keeps a set of hashes per size; sha256sum reads every byte, holes
# included, on one core.
source "$(dirname "$0")/lib.sh"
disk=$corpus/vmfarm.raw
sizes=${SIZES:-4K,16K,64K}
baselines=(sha256sum)
command -v openssl >/dev/null && baselines+=(openssl)

# Keeps the measured command's standard output (measure discards it): the
# wrapper execs the command, so /usr/bin/time still sees only that process.
printf '#!/bin/sh\nout=$1; shift\nexec "$@" >"$out"\n' >"$work/keep-stdout"
chmod +x "$work/keep-stdout"

rm -f "$work"/*.times
for i in $(seq "$runs"); do
  measure "$work/ours" "$work/keep-stdout" "$work/sim.json" \
    "$bin" dedup-stats --simulate --output=json --cluster-sizes "$sizes" "$disk"
  for b in "${baselines[@]}"; do
    case $b in
      sha256sum) measure "$work/$b" sha256sum "$disk" ;;
      openssl) measure "$work/$b" openssl dgst -sha256 "$disk" ;;
    esac
  done
done

ours_t=$(median "$work/ours.times" 1); ours_m=$(median "$work/ours.times" 2)
printf '%-12s %-10s %9s %9s %7s %9s %9s\n' sizes baseline median_s base_s ratio rss_kib base_rss
for b in "${baselines[@]}"; do
  base_t=$(median "$work/$b.times" 1); base_m=$(median "$work/$b.times" 2)
  printf '%-12s %-10s %9.2f %9.2f %7.2f %9d %9d\n' "$sizes" "$b" "$ours_t" "$base_t" \
    "$(echo "$ours_t / $base_t" | bc -l)" "$ours_m" "$base_m"
done

# What the (last) simulation found.
python3 - "$work/sim.json" "$(stat -c %s "$disk")" "$(( $(stat -c %b "$disk") * 512 ))" <<'EOF'
import json, sys
sims = json.load(open(sys.argv[1]))["simulations"]
print(f"file: {int(sys.argv[2])} bytes, {int(sys.argv[3])} on disk")
print(f"{'cluster':<8} {'clusters':>10} {'nonzero':>10} {'unique':>10} {'ratio':>7} {'est_bytes':>12}")
for s in sims:
    print(f"{str(s['cluster-size'] // 1024) + 'K':<8} {s['clusters']:>10} {s['nonzero']:>10} {s['unique']:>10} "
          f"{s['ratio']:>7.2f} {s['estimated-image-size']:>12}")
EOF
