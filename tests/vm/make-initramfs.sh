#!/usr/bin/env bash
# Packs the VM test's initramfs: busybox-static, guest-init.sh as /init, the
# virtio modules from prepare-kernel.sh's directory ($1) and the files of
# $2 as /payload (what the guest copies twice). Writes the gzip'd cpio to $3.
set -euo pipefail
kernel=$(realpath "$1") payload=$(realpath "$2") out=$(realpath "$3")
here=$(cd "$(dirname "$0")" && pwd)
busybox=$(command -v busybox) || { echo "make-initramfs: busybox not found (busybox-static)" >&2; exit 1; }
ldd "$busybox" >/dev/null 2>&1 && { echo "make-initramfs: $busybox is not static (install busybox-static)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,payload}
cp "$busybox" "$root/bin/busybox"
cp "$here/guest-init.sh" "$root/init"
chmod +x "$root/init"
cp "$kernel"/*.ko "$root/lib/modules/"
cp -a "$payload"/. "$root/payload/"
# There may be no cpio on the host: busybox has one.
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$out")
