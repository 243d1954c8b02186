#!/usr/bin/env bash
# Fetches a Linux kernel for the VM test without installing it: Debian's
# linux-image-cloud-amd64 (what it depends on), unpacked with dpkg-deb -x
# into a cache directory ($1, default /var/tmp/qcow2dedup-vm). Leaves
# vmlinuz and the virtio block modules (uncompressed, for busybox insmod) in
# $1/kernel/. Does nothing when they are there already.
set -euo pipefail
cache=${1:-/var/tmp/qcow2dedup-vm}
out=$cache/kernel
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
complete() {
  [ -s "$out/vmlinuz" ] || return 1
  for m in $mods; do [ -s "$out/$m.ko" ] || return 1; done
}
complete && exit 0
mkdir -p "$cache"
work=$(mktemp -d "$cache/prepare.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)
[ -n "$pkg" ] || { echo "prepare-kernel: no kernel package behind linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
(cd "$work" && apt-get download -qq "$pkg" >&2)
dpkg-deb -x "$work"/*.deb "$work/root"
mkdir -p "$work/kernel"
cp "$work"/root/boot/vmlinuz-* "$work/kernel/vmlinuz"
for m in $mods; do
  f=$(find "$work/root/lib/modules" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || { echo "prepare-kernel: $pkg has no module $m" >&2; exit 1; }
  case $f in
    *.ko.xz) xz -dc "$f" >"$work/kernel/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$work/kernel/$m.ko" ;;
    *) cp "$f" "$work/kernel/$m.ko" ;;
  esac
done
echo "$pkg" >"$work/kernel/package"
rm -rf "$out"
mv "$work/kernel" "$out"
