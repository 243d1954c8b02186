# Shared by the bench scripts: the corpus, the binary, and timing helpers.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${QCOW2DEDUP_BIN:-$root/build/apps/qcow2dedup}
corpus=${QCOW2DEDUP_CORPUS:-/var/tmp/qcow2dedup-corpus}
runs=${RUNS:-3}
[ -x "$bin" ] || { echo "bench: build first (bash .ci/build.sh): $bin missing" >&2; exit 1; }
if [ ! -f "$corpus/vmfarm.raw" ] || [ ! -f "$corpus/vm-a.raw" ]; then
  bash "$root/../shared/corpus/make-corpus.sh" "$corpus" >&2
fi
work=$(mktemp -d "${TMPDIR:-/var/tmp}/qcow2dedup-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

# measure OUT_PREFIX CMD...: runs CMD under /usr/bin/time, appends
# "seconds maxrss_kib user_s sys_s" to OUT_PREFIX.times
measure() {
  local out=$1; shift
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f '%e %M %U %S' -o "$work/.t" "$@" >/dev/null
  cat "$work/.t" >>"$out.times"
}

# median FILE COLUMN
median() { sort -n -k"$2" "$1" | awk -v c="$2" '{v[NR]=$c} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

# cpu_per_gib FILE BYTES: the median CPU seconds (user + sys) of FILE's runs per GiB of BYTES
cpu_per_gib() {
  awk '{print $3 + $4}' "$1" | sort -n | awk -v b="$2" '{v[NR]=$1} END {
    m = (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.3f", m * 1073741824 / b }'
}
