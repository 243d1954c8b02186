#!/bin/busybox sh
# /init of the VM test's initramfs (busybox). The kernel command line says
# what to do with the virtio disk /dev/vda (the NBD export):
#   qd=make    make an ext4 file system, copy /payload twice (duplicate
#              data), write fresh random data, record checksums, delete a
#              scratch file with discard on (the guest's TRIM), sync, unmount;
#   qd=add     (an overlay on a disk qd=make made) check every checksum, then
#              copy /payload a third time (data the base holds already),
#              write fresh random data, delete a file, record checksums;
#   qd=verify  mount it read-only and check every checksum.
# The result is one console line starting "QD-RESULT:"; the host reads it.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
result() { echo "QD-RESULT: $*"; sync; poweroff -f; }
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  insmod /lib/modules/$m.ko || result "FAIL insmod $m"
done
# Until the disk is there, a write to /dev/vda would create a plain file in devtmpfs.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || result "FAIL no /dev/vda"
phase=$(sed -n 's/.*qd=\([a-z]*\).*/\1/p' /proc/cmdline)
mkdir -p /mnt
case $phase in
  make)
    mke2fs -q -b 4096 /dev/vda || result "FAIL mke2fs"
    mount -t ext4 -o discard /dev/vda /mnt || result "FAIL mount"
    mkdir /mnt/first /mnt/second
    cp -a /payload/. /mnt/first/ && sync && cp -a /payload/. /mnt/second/ || result "FAIL copy"
    dd if=/dev/urandom of=/mnt/fresh bs=65536 count=48 2>/dev/null || result "FAIL fresh data"
    dd if=/dev/urandom of=/mnt/scratch bs=65536 count=32 2>/dev/null && sync && rm /mnt/scratch || result "FAIL scratch"
    (cd /mnt && find . -type f | sort | xargs md5sum >/tmp/SUMS && cp /tmp/SUMS /mnt/SUMS) || result "FAIL checksums"
    sync
    umount /mnt || result "FAIL umount"
    result "made $(wc -l </tmp/SUMS) files" ;;
  add)
    mount -t ext4 -o discard /dev/vda /mnt || result "FAIL mount"
    (cd /mnt && md5sum -c -s SUMS) || result "FAIL base checksums differ"
    mkdir /mnt/third && cp -a /payload/. /mnt/third/ || result "FAIL copy"
    dd if=/dev/urandom of=/mnt/fresh2 bs=65536 count=16 2>/dev/null || result "FAIL fresh data"
    rm /mnt/first/notes.txt || result "FAIL rm"
    (cd /mnt && find . -type f ! -name SUMS | sort | xargs md5sum >/tmp/SUMS && cp /tmp/SUMS /mnt/SUMS) ||
      result "FAIL checksums"
    sync
    umount /mnt || result "FAIL umount"
    result "added, now $(wc -l </tmp/SUMS) files" ;;
  verify)
    mount -t ext4 -o ro /dev/vda /mnt || result "FAIL mount"
    cd /mnt && md5sum -c -s SUMS || result "FAIL checksums differ"
    result "verified $(wc -l <SUMS) files" ;;
  *) result "FAIL unknown phase '$phase'" ;;
esac
