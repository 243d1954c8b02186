#!/usr/bin/env bash
# fleet: many VMs over one shared base (issue 15). The corpus VMs, 700 MiB
# ext4 images over the template part-a (part-a2: a clone of it that lived a
# little; part-b: the same Debian with more packages; part-c: an older
# Debian), stored four ways, each whole fleet in one timed run, page cache dropped
# before it:
#   (a) qemu-img        separate qemu-img convert -O qcow2 images (part-a too)
#   (b) dedup           separate qcow2dedup convert images (part-a too)
#   (c) qemu-img -B     qemu-img convert -O qcow2 -B part-a.img -F raw overlays
#   (d) dedup -B        qcow2dedup convert -B part-a.img -F raw overlays
# Bytes are allocated bytes on disk (du). The overlays' fleet total adds
# the base they need, part-a.img itself (its allocated bytes); "images" is
# what the method wrote. Both tools sync what they wrote before they end
# (ours by default, qemu-img with -t writeback, as bench/convert.sh pairs
# them). Ratios: against (a) for every row, and for the
# overlays (d) against (c). RUNS (default 3) runs each; medians.
source "$(dirname "$0")/lib.sh"
for f in part-a part-a2 part-b part-c; do
  [ -f "$corpus/$f.img" ] || { echo "fleet: $corpus/$f.img missing (rebuild the corpus)" >&2; exit 1; }
done
base=$corpus/part-a.img
vms="part-a2 part-b part-c"
base_bytes=$(du -B1 "$base" | cut -f1)

# fleet METHOD DIR: converts the fleet into DIR the METHOD way.
fleet() {
  local method=$1 dir=$2 vm
  rm -rf "$dir"; mkdir -p "$dir"
  case $method in
    qemu) for vm in part-a $vms; do qemu-img convert -t writeback -O qcow2 "$corpus/$vm.img" "$dir/$vm.qcow2"; done ;;
    dedup) for vm in part-a $vms; do "$bin" convert "$corpus/$vm.img" "$dir/$vm.qcow2"; done ;;
    qemu-B) for vm in $vms; do qemu-img convert -t writeback -O qcow2 -B "$base" -F raw "$corpus/$vm.img" "$dir/$vm.qcow2"; done ;;
    dedup-B) for vm in $vms; do "$bin" convert -B "$base" -F raw "$corpus/$vm.img" "$dir/$vm.qcow2"; done ;;
  esac
}
export -f fleet; export corpus base vms bin

declare -A secs bytes images
for method in qemu dedup qemu-B dedup-B; do
  rm -f "$work/$method.times"
  for i in $(seq "$runs"); do
    rm -rf "$work/$method"
    measure "$work/$method" bash -c 'set -e; fleet "$0" "$1"' "$method" "$work/$method"
  done
  secs[$method]=$(median "$work/$method.times" 1)
  images[$method]=$(du -B1 -c "$work/$method"/*.qcow2 | tail -1 | cut -f1)
  bytes[$method]=${images[$method]}
  if [[ $method == *-B ]]; then bytes[$method]=$((images[$method] + base_bytes)); fi
  # Every image must be clean and read as its VM.
  for img in "$work/$method"/*.qcow2; do
    vm=$(basename "$img" .qcow2)
    qemu-img check -q "$img" || echo "WARNING: qemu-img check failed on $img" >&2
    qemu-img compare -q "$corpus/$vm.img" "$img" || echo "WARNING: $img differs from $vm.img" >&2
  done
  [ "$method" = dedup-B ] || rm -rf "$work/$method"
done

printf '%-9s %9s %14s %14s %9s %9s %9s %9s\n' method median_s fleet_bytes images_bytes s/qemu bytes/qemu \
  s/qemu-B bytes/qemu-B
for method in qemu dedup qemu-B dedup-B; do
  vs_b_s=-; vs_b_b=-
  if [[ $method == *-B ]]; then
    vs_b_s=$(printf '%.2f' "$(echo "${secs[$method]} / ${secs[qemu-B]}" | bc -l)")
    vs_b_b=$(printf '%.3f' "$(echo "${bytes[$method]} / ${bytes[qemu-B]}" | bc -l)")
  fi
  printf '%-9s %9.2f %14d %14d %9.2f %9.3f %9s %9s\n' "$method" "${secs[$method]}" "${bytes[$method]}" \
    "${images[$method]}" "$(echo "${secs[$method]} / ${secs[qemu]}" | bc -l)" \
    "$(echo "${bytes[$method]} / ${bytes[qemu]}" | bc -l)" "$vs_b_s" "$vs_b_b"
done
echo "base part-a.img: $base_bytes bytes allocated (in the fleet totals of the -B rows)"
