#!/usr/bin/env bash
# serve: fio's nbd engine against `qcow2dedup serve` and against qemu-nbd
# serving a plain qcow2 of the same cluster size, in the same run,
# alternating, the same seeded jobs (dedupe_percentage=50) on both:
#   randwrite  random 4K writes on 4K clusters, iodepth 16
#   seqwrite   sequential 1M writes on 64K clusters, iodepth 16
#   randread   random 4K reads of what randwrite wrote
# One connection each (qemu-nbd has no multi-conn). qemu-nbd runs as
# `-t --cache=writeback`, as qemu-img would; ours with its default
# (writeback). Prints IOPS and throughput medians, their ratio (ours /
# qemu-nbd), stored clusters of both images, server CPU seconds and peak RSS.
# Targets: every ratio >= 0.8; stored clusters <= 60% of qemu-nbd's.
source "$(dirname "$0")/lib.sh"
for t in fio nbdkit qemu-nbd; do command -v $t >/dev/null || { echo "bench: $t missing" >&2; exit 1; }; done
size=${SERVE_SIZE:-128M}           # the 4K jobs' image and region
seq_size=${SERVE_SEQ_SIZE:-512M}   # the 1M job's: long enough to time
fio_common=(--ioengine=nbd --iodepth=16 --numjobs=1 --randrepeat=1 --randseed=20261201
            --dedupe_percentage=50 --output-format=json --group_reporting)

# server KIND IMAGE SOCKET: starts it under /usr/bin/time (CPU, RSS into $work/KIND.srv) and waits for the socket.
server() {
  rm -f "$3"
  if [ "$1" = ours ]; then
    /usr/bin/time -f '%U %S %M' -o "$work/$1.srv" "$bin" serve --socket "$3" "$2" 2>"$work/$1.log" &
  else
    /usr/bin/time -f '%U %S %M' -o "$work/$1.srv" qemu-nbd -f qcow2 -t --cache=writeback -k "$3" "$2" 2>"$work/$1.log" &
  fi
  timer=$!
  for _ in $(seq 300); do [ -S "$3" ] && return 0; sleep 0.05; done
  echo "bench: $1 server did not start: $(cat "$work/$1.log")" >&2; exit 1
}
# stop KIND: SIGTERM to the server (the child of time), then "cpu_s rss_kib" appended to $work/KIND.cpu.
stop() {
  kill -TERM "$(pgrep -P "$timer")"
  wait "$timer" || true
  read -r u s m <"$work/$1.srv"
  echo "$(echo "$u + $s" | bc -l) $m" >>"$work/$1.cpu"
}
# job NAME URI ARGS...: runs fio, appends "iops bw_kib" of its direction to $work/NAME.res
job() {
  local name=$1 uri=$2; shift 2
  fio --name="$name" "${fio_common[@]}" --uri="$uri" "$@" | sed -n '/^{/,$p' >"$work/fio.json"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; d=j["write"] if j["write"]["io_bytes"] else j["read"]; print(d["iops"], d["bw"])' "$work/fio.json" >>"$work/$name.res"
}
stored() {
  if [ "$1" = ours ]; then
    "$bin" info --output=json "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["dedup"]["stored-clusters"])'
  else
    qemu-img check --output=json "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated-clusters"])'
  fi
}

rm -f "$work"/*.res "$work"/*.cpu "$work"/*.stored
for i in $(seq "$runs"); do
  for kind in ours qemu; do
    for cs in 4K 64K; do
      img=$work/$kind-$cs.qcow2 sock=$work/$kind.sock
      vsize=$size; [ $cs = 64K ] && vsize=$seq_size
      rm -f "$img"
      if [ $kind = ours ]; then "$bin" create -o cluster_size=$cs "$img" "$vsize" >/dev/null
      else qemu-img create -q -f qcow2 -o cluster_size=$cs "$img" "$vsize"; fi
      server $kind "$img" "$sock"
      uri="nbd+unix:///?socket=$sock"
      if [ $cs = 4K ]; then
        job $kind-randwrite "$uri" --rw=randwrite --bs=4k --size="$size"
        job $kind-randread "$uri" --rw=randread --bs=4k --size="$size"
      else
        job $kind-seqwrite "$uri" --rw=write --bs=1M --size="$seq_size"
      fi
      stop $kind
      stored $kind "$img" >>"$work/$kind-$cs.stored"
      qemu-img check -q "$img" || echo "WARNING: qemu-img check failed on $img" >&2
    done
  done
done

printf '%-10s %12s %12s %7s %14s %14s %7s\n' job ours_iops qemu_iops ratio ours_MiB/s qemu_MiB/s ratio
for name in randwrite seqwrite randread; do
  oi=$(median "$work/ours-$name.res" 1); qi=$(median "$work/qemu-$name.res" 1)
  ob=$(median "$work/ours-$name.res" 2); qb=$(median "$work/qemu-$name.res" 2)
  printf '%-10s %12.0f %12.0f %7.2f %14.1f %14.1f %7.2f\n' $name "$oi" "$qi" "$(echo "$oi / $qi" | bc -l)" \
    "$(echo "$ob / 1024" | bc -l)" "$(echo "$qb / 1024" | bc -l)" "$(echo "$ob / $qb" | bc -l)"
done
for cs in 4K 64K; do
  os=$(median "$work/ours-$cs.stored" 1); qs=$(median "$work/qemu-$cs.stored" 1)
  printf 'stored clusters (%s clusters): ours %d, qemu-nbd %d, ours/qemu-nbd %.2f (target <= 0.60)\n' $cs "$os" "$qs" \
    "$(echo "$os / $qs" | bc -l)"
done
printf 'server per session (median): ours %.2f CPU s, peak RSS %d KiB; qemu-nbd %.2f CPU s, peak RSS %d KiB\n' \
  "$(median "$work/ours.cpu" 1)" "$(median "$work/ours.cpu" 2)" "$(median "$work/qemu.cpu" 1)" "$(median "$work/qemu.cpu" 2)"
