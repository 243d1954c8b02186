#!/usr/bin/env python3
"""Writes a corpus of hostile qcow2 images into a directory.

Usage: make_hostile.py OUTDIR [--tool PATH-TO-qcow2dedup]

Valid base images are built with qemu-img / qemu-io (and, for the dedup
index cases, with qcow2dedup's own convert); each hostile file is a copy of
a base with a few bytes patched at offsets computed by parsing the header,
the L1/L2 tables, the refcount table and blocks, the snapshot table and the
header extensions (QEMU's docs/interop/qcow2.rst). The attacks follow QEMU's
iotests 060 (overlapping metadata) and 080 (input validation) and add our
own header extension (0x44445550) lying with its autoclear bit set.

OUTDIR/manifest.json lists every hostile file:
  {"file": name, "what": description, "group": "qemu"|"index"|"backing"|"raw",
   "write_input": name of a file in OUTDIR, "write_offset": guest offset}
group "index": only our dedup index lies; the image is otherwise sound, so
every data-reading command must succeed with qemu-img's view of the data,
and a write of data stored elsewhere in the image must give correct data.

Only the Python standard library is used.
"""

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys

# Header field offsets (qcow2.rst).
OFF_MAGIC = 0
OFF_VERSION = 4
OFF_BACKING_OFFSET = 8
OFF_BACKING_SIZE = 16
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_CRYPT = 32
OFF_L1_SIZE = 36
OFF_L1_OFFSET = 40
OFF_REFTABLE_OFFSET = 48
OFF_REFTABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_SNAPSHOTS_OFFSET = 64
OFF_INCOMPAT = 72
OFF_COMPAT = 80
OFF_AUTOCLEAR = 88
OFF_REFCOUNT_ORDER = 96
OFF_HEADER_LENGTH = 100
OFF_COMPRESSION_TYPE = 104

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
EXT_DEDUP = 0x44445550

AUTOCLEAR_DEDUP = 1 << 48
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

CS = 4096  # cluster size of most bases


def run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        sys.exit("make_hostile: %s failed (%d):\n%s%s" %
                 (" ".join(cmd), r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")))
    return r


def be64(v):
    return struct.pack(">Q", v & 0xFFFFFFFFFFFFFFFF)


def be32(v):
    return struct.pack(">I", v & 0xFFFFFFFF)


def be16(v):
    return struct.pack(">H", v & 0xFFFF)


class Image:
    """A parsed qcow2 file (a well-formed base; no validation here)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        d = self.data
        (self.magic, self.version, self.backing_offset, self.backing_size, self.cluster_bits, self.size,
         self.crypt, self.l1_size, self.l1_offset, self.reftable_offset, self.reftable_clusters,
         self.nb_snapshots, self.snapshots_offset) = struct.unpack_from(">IIQIIQIIQQIIQ", d, 0)
        assert self.magic == 0x514649FB
        self.cs = 1 << self.cluster_bits
        self.incompat, self.compat, self.autoclear, self.refcount_order, self.header_length = \
            struct.unpack_from(">QQQII", d, 72)
        self.refcount_bits = 1 << self.refcount_order
        # Header extensions: (magic, payload offset, length).
        self.exts = []
        pos = self.header_length
        while pos + 8 <= self.cs:
            magic, length = struct.unpack_from(">II", d, pos)
            if magic == EXT_END:
                break
            self.exts.append((magic, pos + 8, length))
            pos += 8 + ((length + 7) & ~7)
        self.ext_end = pos  # where the end-of-extensions marker is
        self.l1 = [struct.unpack_from(">Q", d, self.l1_offset + 8 * i)[0] for i in range(self.l1_size)]
        self.l2_tables = sorted({e & OFFSET_MASK for e in self.l1 if e & OFFSET_MASK})
        nref = self.reftable_clusters * self.cs // 8
        self.reftable = [struct.unpack_from(">Q", d, self.reftable_offset + 8 * i)[0] for i in range(nref)]
        self.refblocks = [e for e in self.reftable if e]
        # Snapshots.
        self.snapshots = []
        pos = self.snapshots_offset
        for _ in range(self.nb_snapshots):
            l1_off, l1_size, id_len, name_len, _ds, _dn, _vc, _vs, extra = struct.unpack_from(">QIHHIIQII", d, pos)
            self.snapshots.append({"entry": pos, "l1_offset": l1_off, "l1_size": l1_size, "extra": extra})
            length = 40 + extra + id_len + name_len
            pos += (length + 7) & ~7

    def ext(self, magic):
        for m, off, length in self.exts:
            if m == magic:
                return off, length
        return None

    def l2_entry_offset(self, guest_cluster):
        """File offset of the L2 entry of a guest cluster (its L2 table must exist)."""
        per = self.cs // 8
        l2 = self.l1[guest_cluster // per] & OFFSET_MASK
        assert l2, "no L2 table for guest cluster %d" % guest_cluster
        return l2 + 8 * (guest_cluster % per)

    def l2_entry(self, guest_cluster):
        return struct.unpack_from(">Q", self.data, self.l2_entry_offset(guest_cluster))[0]

    def host(self, guest_cluster):
        return self.l2_entry(guest_cluster) & OFFSET_MASK

    def refcount_entry_offset(self, host_cluster):
        """File offset of the refcount of a host cluster (16-bit refcounts)."""
        assert self.refcount_bits == 16
        per = self.cs * 8 // self.refcount_bits
        block = self.reftable[host_cluster // per]
        return block + 2 * (host_cluster % per)

    def refcount(self, host_cluster):
        return struct.unpack_from(">H", self.data, self.refcount_entry_offset(host_cluster))[0]


class Corpus:
    def __init__(self, outdir, tool):
        self.outdir = outdir
        self.tool = tool
        self.work = os.path.join(outdir, ".bases")
        os.makedirs(self.work, exist_ok=True)
        self.manifest = []
        self.rng = random.Random(20240601)

    def p(self, name):
        return os.path.join(self.outdir, name)

    def add(self, name, base, what, patches=(), group="qemu", write=None, truncate=None, append=None):
        """Copies base to name, applies (offset, bytes) patches, registers it."""
        dst = self.p(name)
        shutil.copyfile(base, dst)
        with open(dst, "r+b") as f:
            for off, b in patches:
                f.seek(off)
                f.write(b)
            if append is not None:
                f.seek(0, os.SEEK_END)
                f.write(append)
            if truncate is not None:
                f.truncate(truncate)
        entry = {"file": name, "what": what, "group": group}
        if write:
            entry["write_input"], entry["write_offset"] = write
        else:
            entry["write_input"], entry["write_offset"] = self.default_write
        self.manifest.append(entry)
        return dst

    def add_bytes(self, name, data, what, group="qemu", write=None):
        with open(self.p(name), "wb") as f:
            f.write(data)
        entry = {"file": name, "what": what, "group": group}
        entry["write_input"], entry["write_offset"] = write or self.default_write
        self.manifest.append(entry)


def build_qemu_bases(c):
    """4K-cluster bases made by QEMU: plain, with a snapshot, compressed, 64K."""
    w = c.work
    plain = os.path.join(w, "plain.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", plain, "8M"])
    # Guest clusters: 0 = 0x11, 1 = 0x22, 2 = 0x11 again, 3-4 = 0x33,
    # 600 = 0x44 (second L2 table), 1500 = 0x55 (third L2 table).
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4k", "-c", "write -P 0x22 4k 4k",
         "-c", "write -P 0x11 8k 4k", "-c", "write -P 0x33 12k 8k", "-c", "write -P 0x44 2400k 4k",
         "-c", "write -P 0x55 6000k 4k", plain])

    snap = os.path.join(w, "snap.qcow2")
    shutil.copyfile(plain, snap)
    run(["qemu-img", "snapshot", "-c", "snap1", snap])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 4k", snap])

    comp = os.path.join(w, "comp.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", comp, "8M"])
    # Random data compresses badly; a half-random cluster takes several sectors.
    half = bytes(c.rng.getrandbits(8) for _ in range(2048)) + b"\x00" * 2048
    with open(os.path.join(w, "half.bin"), "wb") as f:
        f.write(half)
    run(["qemu-io", "-f", "qcow2", "-c", "write -c -P 0x77 0 4k", "-c", "write -P 0x22 4k 4k", comp])
    raw = os.path.join(w, "comp_src.raw")
    with open(raw, "wb") as f:
        f.write(b"\x77" * 4096 + b"\x22" * 4096 + half + b"\x00" * (8 * 1024 * 1024 - 3 * 4096))
    comp2 = os.path.join(w, "comp2.qcow2")
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, comp2])

    zstd = os.path.join(w, "zstd.qcow2")
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd",
         raw, zstd])

    big = os.path.join(w, "big.qcow2")  # 64K clusters: iotest 060's layout
    run(["qemu-img", "create", "-q", "-f", "qcow2", big, "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 0 64k", "-c", "write -P 0x2b 1M 64k", big])

    bitmap = os.path.join(w, "bitmap.qcow2")
    shutil.copyfile(plain, bitmap)
    run(["qemu-img", "bitmap", "--add", bitmap, "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x12 64k 4k", bitmap])

    # The generic write: a new cluster, then copies of clusters 1 (0x22) and
    # 600 (0x44) over guest clusters 3..5 (0x33, 0x33, unallocated).
    winput = c.p("write_qemu.bin")
    with open(winput, "wb") as f:
        f.write(b"\x5a" * 4096 + b"\x22" * 4096 + b"\x44" * 4096)
    c.default_write = ("write_qemu.bin", 3 * 4096)
    return plain, snap, comp, comp2, zstd, big, bitmap


def header_cases(c, plain):
    im = Image(plain)
    add = lambda name, what, patches, **kw: c.add(name, plain, what, patches, **kw)
    # iotest 080: huge and invalid header fields.
    add("hdr_header_length_ffffffff.qcow2", "header_length 0xffffffff", [(OFF_HEADER_LENGTH, be32(0xFFFFFFFF))])
    add("hdr_header_length_7fffffff.qcow2", "header_length 0x7fffffff", [(OFF_HEADER_LENGTH, be32(0x7FFFFFFF))])
    add("hdr_header_length_short.qcow2", "header_length 72 on a version 3 image", [(OFF_HEADER_LENGTH, be32(72))])
    add("hdr_header_length_odd.qcow2", "header_length 105, not a multiple of 8", [(OFF_HEADER_LENGTH, be32(105))])
    # A huge unknown extension, with the backing file offset pointing past it.
    add("ext_huge_unknown.qcow2", "unknown header extension of length 0x7fffffff",
        [(im.header_length, be32(0x12345678) + be32(0x7FFFFFFF)), (OFF_BACKING_OFFSET, be64(0xFFFFFFFFFFFFFFFF))])
    add("ext_length_past_cluster.qcow2", "header extension running past the end of cluster 0",
        [(im.header_length, be32(0x12345678) + be32(CS))])
    add("ext_dedup_twice.qcow2", "our extension twice, both lying",
        [(im.header_length, be32(EXT_DEDUP) + be32(56) + be32(1) + be32(1) + be64(CS) + be64(1 << 40) + b"\x00" * 32 +
          be32(EXT_DEDUP) + be32(56) + be32(1) + be32(1) + be64(1 << 50) + be64(7) + b"\xff" * 32 + be64(0)),
         (OFF_AUTOCLEAR, be64(AUTOCLEAR_DEDUP))])
    add("hdr_reftable_clusters_ffffffff.qcow2", "refcount_table_clusters 0xffffffff",
        [(OFF_REFTABLE_CLUSTERS, be32(0xFFFFFFFF))])
    add("hdr_reftable_clusters_20001.qcow2", "refcount_table_clusters 0x20001",
        [(OFF_REFTABLE_CLUSTERS, be32(0x20001))])
    add("hdr_reftable_clusters_0.qcow2", "refcount_table_clusters 0", [(OFF_REFTABLE_CLUSTERS, be32(0))])
    add("hdr_reftable_misaligned.qcow2", "refcount table offset 0x1234567890abcdef",
        [(OFF_REFTABLE_OFFSET, be64(0x1234567890ABCDEF))])
    add("hdr_reftable_offset_huge.qcow2", "refcount table at 0xffffffffffff0000, 0x7f clusters",
        [(OFF_REFTABLE_OFFSET, be64(0xFFFFFFFFFFFF0000)), (OFF_REFTABLE_CLUSTERS, be32(0x7F))])
    add("hdr_reftable_beyond_eof.qcow2", "refcount table past the end of the file",
        [(OFF_REFTABLE_OFFSET, be64(64 * 1024 * 1024))])
    add("hdr_nb_snapshots_ffffffff.qcow2", "nb_snapshots 0xffffffff", [(OFF_NB_SNAPSHOTS, be32(0xFFFFFFFF))])
    add("hdr_nb_snapshots_7fffffff.qcow2", "nb_snapshots 0x7fffffff", [(OFF_NB_SNAPSHOTS, be32(0x7FFFFFFF))])
    add("hdr_snapshots_offset_huge.qcow2", "snapshot table at 0xffffffffffff0000, 0xffff snapshots",
        [(OFF_SNAPSHOTS_OFFSET, be64(0xFFFFFFFFFFFF0000)), (OFF_NB_SNAPSHOTS, be32(0xFFFF))])
    add("hdr_snapshots_misaligned_none.qcow2", "snapshot table offset 0x1234567890abcdef with no snapshots",
        [(OFF_SNAPSHOTS_OFFSET, be64(0x1234567890ABCDEF)), (OFF_NB_SNAPSHOTS, be32(0))])
    add("hdr_snapshots_at_header.qcow2", "one snapshot whose table is the header",
        [(OFF_SNAPSHOTS_OFFSET, be64(0)), (OFF_NB_SNAPSHOTS, be32(1))])
    # (65536, the limit, takes qemu-img, the judge, half a minute.)
    add("hdr_snapshots_beyond_eof.qcow2", "4096 snapshots past the end of the file",
        [(OFF_SNAPSHOTS_OFFSET, be64(16 << 20)), (OFF_NB_SNAPSHOTS, be32(0x1000))])
    add("hdr_l1_size_ffffffff.qcow2", "l1_size 0xffffffff", [(OFF_L1_SIZE, be32(0xFFFFFFFF))])
    add("hdr_l1_size_7fffffff.qcow2", "l1_size 0x7fffffff", [(OFF_L1_SIZE, be32(0x7FFFFFFF))])
    add("hdr_l1_size_4m_entries.qcow2", "l1_size 4M entries (the 32 MiB limit) past the end of the file",
        [(OFF_L1_SIZE, be32(4 << 20))])
    add("hdr_l1_offset_huge.qcow2", "L1 at 0x7fffffffffff0000 with 0xffff entries",
        [(OFF_L1_OFFSET, be64(0x7FFFFFFFFFFF0000)), (OFF_L1_SIZE, be32(0xFFFF))])
    add("hdr_l1_misaligned.qcow2", "L1 at 0x1234567890abcdef", [(OFF_L1_OFFSET, be64(0x1234567890ABCDEF)),
                                                                  (OFF_L1_SIZE, be32(1))])
    add("hdr_l1_misaligned_512.qcow2", "L1 table 512 bytes into its cluster", [(OFF_L1_OFFSET, be64(im.l1_offset + 512))])
    add("hdr_l1_size_too_small.qcow2", "l1_size 1 for an 8 MiB disk (4 entries needed)", [(OFF_L1_SIZE, be32(1))])
    add("hdr_l1_size_zero.qcow2", "l1_size 0 with data", [(OFF_L1_SIZE, be32(0))])
    add("hdr_size_huge.qcow2", "virtual size 2^62 with a 4-entry L1", [(OFF_SIZE, be64(1 << 62))])
    add("hdr_size_max.qcow2", "virtual size 0xffffffffffffffff", [(OFF_SIZE, be64(0xFFFFFFFFFFFFFFFF))])
    add("hdr_backing_size_huge.qcow2", "backing file name of 0xffffffff bytes at 0x1000",
        [(OFF_BACKING_OFFSET, be64(0x1000)), (OFF_BACKING_SIZE, be32(0xFFFFFFFF))])
    add("hdr_backing_offset_beyond_cluster.qcow2", "backing file name past cluster 0",
        [(OFF_BACKING_OFFSET, be64(0xFFFFFFFFFFFFFFF0)), (OFF_BACKING_SIZE, be32(100))])
    add("hdr_cluster_bits_8.qcow2", "cluster_bits 8", [(OFF_CLUSTER_BITS, be32(8))])
    add("hdr_cluster_bits_22.qcow2", "cluster_bits 22", [(OFF_CLUSTER_BITS, be32(22))])
    add("hdr_cluster_bits_63.qcow2", "cluster_bits 63", [(OFF_CLUSTER_BITS, be32(63))])
    add("hdr_version_1.qcow2", "version 1", [(OFF_VERSION, be32(1))])
    add("hdr_version_4.qcow2", "version 4", [(OFF_VERSION, be32(4))])
    add("hdr_refcount_order_7.qcow2", "refcount_order 7 (128-bit refcounts)", [(OFF_REFCOUNT_ORDER, be32(7))])
    add("hdr_refcount_order_ffffffff.qcow2", "refcount_order 0xffffffff", [(OFF_REFCOUNT_ORDER, be32(0xFFFFFFFF))])
    add("hdr_crypt_aes.qcow2", "crypt_method 1 (AES) without a key", [(OFF_CRYPT, be32(1))])
    add("hdr_crypt_huge.qcow2", "crypt_method 0xffffffff", [(OFF_CRYPT, be32(0xFFFFFFFF))])
    add("hdr_incompat_unknown.qcow2", "unknown incompatible feature bit 20", [(OFF_INCOMPAT, be64(1 << 20))])
    add("hdr_incompat_corrupt.qcow2", "corrupt bit set", [(OFF_INCOMPAT, be64(2))])
    add("hdr_incompat_dirty_corrupt.qcow2", "dirty and corrupt bits set", [(OFF_INCOMPAT, be64(3))])
    add("hdr_incompat_data_file_missing.qcow2", "external data file bit without the extension",
        [(OFF_INCOMPAT, be64(4))])
    add("hdr_incompat_extended_l2.qcow2", "extended L2 bit on an image with 8-byte L2 entries",
        [(OFF_INCOMPAT, be64(16))])
    add("hdr_compression_type_bad.qcow2", "compression type 7 with its incompatible bit",
        [(OFF_INCOMPAT, be64(8)), (OFF_COMPRESSION_TYPE, bytes([7]))])
    c.add("hdr_truncated_50.qcow2", plain, "the file ends 50 bytes into the header", truncate=50)
    c.add("hdr_truncated_in_l2.qcow2", plain, "the file ends inside the first L2 table", truncate=im.l2_tables[0] + 100)
    c.add_bytes("hdr_magic_only.qcow2", b"QFI\xfb", "the magic and nothing else")
    c.add_bytes("hdr_all_ff.qcow2", b"QFI\xfb" + b"\xff" * (3 * CS - 4), "the magic, then 0xff bytes")
    c.add_bytes("empty.qcow2", b"", "an empty file", group="raw")


def metadata_cases(c, plain, big):
    im = Image(plain)
    add = lambda name, what, patches, **kw: c.add(name, plain, what, patches, **kw)
    l2a = im.l2_tables[0]
    rb = im.refblocks[0]
    d0 = im.host(0)
    eof = len(im.data)
    # iotest 060: overlapping metadata.
    add("l1_entry_points_at_l1.qcow2", "L1 entry 0: the L2 table is the L1 table",
        [(im.l1_offset, be64(COPIED | im.l1_offset))])
    add("l1_entry_points_at_reftable.qcow2", "L1 entry 0: the L2 table is the refcount table",
        [(im.l1_offset, be64(COPIED | im.reftable_offset))])
    add("l1_entry_points_at_refblock.qcow2", "L1 entry 0: the L2 table is the refcount block",
        [(im.l1_offset, be64(COPIED | rb))])
    add("l1_entry_points_at_header.qcow2", "L1 entry 0: the L2 table is cluster 0",
        [(im.l1_offset, be64(COPIED | 0))])
    add("l1_overlaps_reftable.qcow2", "the L1 table is the refcount table",
        [(OFF_L1_OFFSET, be64(im.reftable_offset))])
    add("l1_overlaps_header.qcow2", "the L1 table is the header", [(OFF_L1_OFFSET, be64(0))])
    add("reftable_entry_points_at_l1.qcow2", "refcount table entry 0: the refcount block is the L1 table",
        [(im.reftable_offset, be64(im.l1_offset))])
    add("reftable_entry_points_at_l2.qcow2", "refcount table entry 0: the refcount block is an L2 table",
        [(im.reftable_offset, be64(l2a))])
    add("reftable_entry_points_at_itself.qcow2", "refcount table entry 0: the refcount block is the table",
        [(im.reftable_offset, be64(im.reftable_offset))])
    add("reftable_at_header.qcow2", "the refcount table is the header", [(OFF_REFTABLE_OFFSET, be64(0))])
    add("reftable_overlaps_l1.qcow2", "the refcount table is the L1 table",
        [(OFF_REFTABLE_OFFSET, be64(im.l1_offset))])
    add("two_l1_entries_share_l2.qcow2", "L1 entries 0 and 1 share one L2 table",
        [(im.l1_offset + 8, be64(im.l1[0]))])
    add("l2_entry_points_at_refblock.qcow2", "guest cluster 0's data is the refcount block",
        [(im.l2_entry_offset(0), be64(COPIED | rb))])
    add("l2_entry_points_at_l1.qcow2", "guest cluster 1's data is the L1 table",
        [(im.l2_entry_offset(1), be64(COPIED | im.l1_offset))])
    add("l2_entry_points_at_own_l2.qcow2", "guest cluster 0's data is its own L2 table",
        [(im.l2_entry_offset(0), be64(COPIED | l2a))])
    add("l2_entry_points_at_header.qcow2", "guest cluster 0's data is cluster 0", [(im.l2_entry_offset(0), be64(COPIED | 0))])
    add("l2_entry_points_at_reftable.qcow2", "guest cluster 3's data is the refcount table",
        [(im.l2_entry_offset(3), be64(COPIED | im.reftable_offset))])
    add("l2_two_entries_share_copied.qcow2", "guest clusters 0 and 1 share one host cluster, both COPIED, refcount 1",
        [(im.l2_entry_offset(1), be64(COPIED | d0))])
    add("l2_entry_points_at_other_l2.qcow2", "guest cluster 3's data is the second L2 table",
        [(im.l2_entry_offset(3), be64(COPIED | im.l2_tables[1]))])
    # Pointing beyond the end of the file.
    add("l1_entry_beyond_eof.qcow2", "L1 entry 1 points 1 GiB past the end of the file",
        [(im.l1_offset + 8, be64(COPIED | (1 << 30)))])
    add("l1_entry_huge.qcow2", "L1 entry 0 points at 0x00fffffffffffe00", [(im.l1_offset, be64(COPIED | OFFSET_MASK & ~(CS - 1)))])
    add("l2_entry_beyond_eof.qcow2", "guest cluster 0 at 0xffffff0000 (iotest 080)",
        [(im.l2_entry_offset(0), be64(0x800000FFFFFF0000))])
    add("l2_entry_huge_compressed.qcow2", "guest cluster 0: 0xbfffffffffff0000 (iotest 080)",
        [(im.l2_entry_offset(0), be64(0xBFFFFFFFFFFF0000))])
    add("l2_entry_just_past_eof.qcow2", "guest cluster 1 one cluster past the end of the file",
        [(im.l2_entry_offset(1), be64(COPIED | ((eof + CS - 1) // CS * CS)))])
    add("reftable_entry_beyond_eof.qcow2", "refcount table entry 0 points 1 GiB past the end of the file",
        [(im.reftable_offset, be64(1 << 30))])
    add("reftable_entry_huge.qcow2", "refcount table entry 0 is 0xffffffffffffff00",
        [(im.reftable_offset, be64(0xFFFFFFFFFFFFFF00))])
    # Misaligned offsets.
    add("l1_entry_misaligned.qcow2", "L1 entry 0 is 512 bytes into the L2 table's cluster",
        [(im.l1_offset, be64(COPIED | (l2a + 512)))])
    add("l2_entry_misaligned.qcow2", "guest cluster 0's data 512 bytes into its cluster",
        [(im.l2_entry_offset(0), be64(COPIED | (d0 + 512)))])
    add("l2_zero_alloc_misaligned.qcow2", "zero-flagged entry with a misaligned allocation",
        [(im.l2_entry_offset(0), be64(COPIED | (d0 + 512) | 1))])
    add("l2_entry_reserved_bits.qcow2", "L2 entry with reserved bits 1-8 and 56-61 set",
        [(im.l2_entry_offset(1), be64(COPIED | im.host(1) | 0x1FE | (0x3F << 56)))])
    add("reftable_entry_misaligned.qcow2", "refcount table entry 0 is 512 bytes into its cluster",
        [(im.reftable_offset, be64(rb + 512))])
    # Refcounts that lie (iotest 060's empty refcount table / block).
    add("refblock_zeroed.qcow2", "the refcount block is all zeros", [(rb, b"\x00" * CS)])
    add("reftable_zeroed.qcow2", "the refcount table is all zeros", [(im.reftable_offset, b"\x00" * CS)])
    add("refcount_zero_for_data.qcow2", "guest cluster 1's host cluster has refcount 0",
        [(im.refcount_entry_offset(im.host(1) // CS), be16(0))])
    add("refcount_zero_for_l2.qcow2", "the second L2 table has refcount 0",
        [(im.refcount_entry_offset(im.l2_tables[1] // CS), be16(0))])
    add("refcount_zero_for_l1.qcow2", "the L1 table has refcount 0",
        [(im.refcount_entry_offset(im.l1_offset // CS), be16(0))])
    add("refcount_too_high.qcow2", "guest cluster 1's host cluster has refcount 5 (COPIED still set)",
        [(im.refcount_entry_offset(im.host(1) // CS), be16(5))])
    add("refcount_max.qcow2", "guest cluster 1's host cluster has refcount 0xffff",
        [(im.refcount_entry_offset(im.host(1) // CS), be16(0xFFFF))])
    add("copied_flag_missing.qcow2", "COPIED clear on clusters with refcount 1",
        [(im.l2_entry_offset(0), be64(d0)), (im.l1_offset, be64(l2a))])
    # iotest 060's layout with 64K clusters: data reference into the refcount block.
    bi = Image(big)
    c.add("big_l2_entry_points_at_refblock.qcow2", big, "64K clusters: guest cluster 0's data is the refcount block",
          [(bi.l2_entry_offset(0), be64(COPIED | bi.refblocks[0]))])
    c.add("big_l1_entry_points_at_l1.qcow2", big, "64K clusters: L1 entry 0 points at the L1 table",
          [(bi.l1_offset, be64(COPIED | bi.l1_offset))])


def snapshot_cases(c, snap):
    im = Image(snap)
    s = im.snapshots[0]
    add = lambda name, what, patches, **kw: c.add(name, snap, what, patches, **kw)
    add("snap_l1_offset_misaligned.qcow2", "snapshot L1 table at 0x400200 (iotest 080)",
        [(s["entry"], be64(0x400200))])
    add("snap_l1_size_huge.qcow2", "snapshot l1_size 0x10000000 (iotest 080)", [(s["entry"] + 8, be32(0x10000000))])
    add("snap_l1_size_ffffffff.qcow2", "snapshot l1_size 0xffffffff", [(s["entry"] + 8, be32(0xFFFFFFFF))])
    add("snap_l1_beyond_eof.qcow2", "snapshot L1 table 1 GiB past the end of the file", [(s["entry"], be64(1 << 30))])
    add("snap_l1_at_header.qcow2", "snapshot L1 table is the header", [(s["entry"], be64(0))])
    add("snap_l1_at_reftable.qcow2", "snapshot L1 table is the refcount table", [(s["entry"], be64(im.reftable_offset))])
    snap_l1 = s["l1_offset"]
    add("snap_l1_entry_beyond_eof.qcow2", "snapshot L1 entry 0 points past the end of the file",
        [(snap_l1, be64(1 << 32))])
    add("snap_l1_entry_at_active_l1.qcow2", "snapshot L1 entry 0 points at the active L1 table",
        [(snap_l1, be64(im.l1_offset))])
    add("snap_extra_data_huge.qcow2", "snapshot extra_data_size 0xffffffff", [(s["entry"] + 36, be32(0xFFFFFFFF))])
    add("snap_id_name_huge.qcow2", "snapshot id and name sizes 0xffff", [(s["entry"] + 12, be16(0xFFFF) + be16(0xFFFF))])
    add("snap_table_misaligned.qcow2", "snapshot table 512 bytes into its cluster",
        [(OFF_SNAPSHOTS_OFFSET, be64(im.snapshots_offset + 512))])
    add("snap_count_past_table.qcow2", "nb_snapshots 200 with one entry", [(OFF_NB_SNAPSHOTS, be32(200))])
    add("snap_l1_size_zero_active.qcow2", "active l1_size 0 with an internal snapshot (iotest 080)",
        [(OFF_L1_SIZE, be32(0))])


def compressed_cases(c, comp, comp2, zstd):
    im = Image(comp)
    e = im.l2_entry(0)
    assert e & COMPRESSED
    x = 62 - (im.cluster_bits - 8)
    off = e & ((1 << x) - 1)
    add = lambda name, what, patches, base=comp, **kw: c.add(name, base, what, patches, **kw)
    add("comp_offset_beyond_eof.qcow2", "compressed cluster 1 GiB past the end of the file",
        [(im.l2_entry_offset(0), be64(COMPRESSED | (1 << 30)))])
    add("comp_offset_max.qcow2", "compressed descriptor with every offset bit set",
        [(im.l2_entry_offset(0), be64(COMPRESSED | ((1 << x) - 1)))])
    add("comp_sectors_huge.qcow2", "compressed descriptor with every sector-count bit set",
        [(im.l2_entry_offset(0), be64(COMPRESSED | (((1 << (62 - x)) - 1) << x) | off))])
    add("comp_garbage_payload.qcow2", "compressed cluster whose payload is random bytes",
        [(off, bytes(c.rng.getrandbits(8) for _ in range(512 - off % 512)))])
    add("comp_at_header.qcow2", "compressed descriptor pointing into the header", [(im.l2_entry_offset(0), be64(COMPRESSED | 0x48))])
    add("comp_at_l1.qcow2", "compressed descriptor pointing at the L1 table",
        [(im.l2_entry_offset(0), be64(COMPRESSED | im.l1_offset))])
    add("comp_with_copied.qcow2", "compressed descriptor with COPIED set", [(im.l2_entry_offset(0), be64(e | COPIED))])
    add("comp_with_zero_flag.qcow2", "compressed descriptor with bit 0 set", [(im.l2_entry_offset(0), be64(e | 1))])
    i2 = Image(comp2)
    e2 = i2.l2_entry(2)
    assert e2 & COMPRESSED
    off2 = e2 & ((1 << x) - 1)
    add("comp_truncated_payload.qcow2", "the file ends inside a multi-sector compressed cluster", [],
        base=comp2, truncate=off2 + 100)
    add("comp_payload_flipped.qcow2", "a byte flipped inside a deflate stream", [(off2 + 10, bytes([i2.data[off2 + 10] ^ 0xFF]))],
        base=comp2)
    iz = Image(zstd)
    ez = iz.l2_entry(2)
    offz = ez & ((1 << x) - 1)
    add("comp_zstd_garbage.qcow2", "zstd compressed cluster whose payload is random bytes",
        [(offz, bytes(c.rng.getrandbits(8) for _ in range(64)))], base=zstd)
    add("comp_zstd_huge_frame.qcow2", "zstd frame header claiming a 2 GiB content size",
        [(offz, bytes([0x28, 0xB5, 0x2F, 0xFD, 0xA0]) + be32(0x80000000)[::-1])], base=zstd)


def backing_cases(c, plain):
    im = Image(plain)
    name_at = CS - 256
    assert name_at > im.ext_end + 8

    def with_backing(name, backing, what, extra=()):
        b = backing.encode()
        c.add(name, plain, what, [(OFF_BACKING_OFFSET, be64(name_at)), (OFF_BACKING_SIZE, be32(len(b))),
                                  (name_at, b)] + list(extra), group="backing")

    with_backing("backing_self.qcow2", "backing_self.qcow2", "its own backing file")
    with_backing("backing_cycle_a.qcow2", "backing_cycle_b.qcow2", "backing file loop a -> b -> a")
    with_backing("backing_cycle_b.qcow2", "backing_cycle_a.qcow2", "backing file loop b -> a -> b")
    with_backing("backing_missing.qcow2", "does-not-exist.qcow2", "missing backing file")
    with_backing("backing_directory.qcow2", ".", "backing file is a directory")
    with_backing("backing_empty_name.qcow2", "", "backing file offset with a zero length name")
    # A long chain: each file's backing file is the next; the last loops to the first.
    for i in range(4):
        with_backing("backing_chain_%d.qcow2" % i, "backing_chain_%d.qcow2" % ((i + 1) % 4),
                     "a 4-image backing loop, link %d" % i)


def bitmap_cases(c, bitmap):
    im = Image(bitmap)
    ext = im.ext(EXT_BITMAPS)
    assert ext, "qemu-img bitmap --add made no bitmaps extension"
    off, _ = ext
    add = lambda name, what, patches: c.add(name, bitmap, what, patches)
    add("bitmaps_dir_beyond_eof.qcow2", "bitmap directory past the end of the file", [(off + 16, be64(1 << 40))])
    add("bitmaps_count_huge.qcow2", "nb_bitmaps 0xffffffff", [(off, be32(0xFFFFFFFF))])
    add("bitmaps_dir_size_huge.qcow2", "bitmap directory size 2^40", [(off + 8, be64(1 << 40))])
    add("bitmaps_dir_at_l1.qcow2", "bitmap directory is the L1 table", [(off + 16, be64(im.l1_offset))])


def encode_exts(exts, room):
    """Header extensions (magic, payload) and the end marker, padded to room bytes."""
    out = b""
    for m, payload in exts:
        out += be32(m) + be32(len(payload)) + payload + b"\x00" * (-len(payload) % 8)
    out += be64(0)
    assert len(out) <= room
    return out + b"\x00" * (room - len(out))


def sha256(b):
    return hashlib.sha256(b).digest()


def dedup_cases(c):
    """Images made by qcow2dedup whose own index lies, the autoclear bit set."""
    w = c.work
    rng = c.rng
    blocks = {k: bytes(rng.getrandbits(8) for _ in range(CS)) for k in "ABCDE"}
    # Guest clusters: A B A C A B 0 0 0 0 D B E 0 ... (32 clusters = 128 KiB).
    layout = "ABACAB----DBE" + "-" * 19
    raw = b"".join(blocks[k] if k != "-" else b"\x00" * CS for k in layout)
    src = os.path.join(w, "dedup_src.raw")
    with open(src, "wb") as f:
        f.write(raw)
    base = os.path.join(w, "dedup.qcow2")
    run([c.tool, "convert", "-q", "-f", "raw", "-o", "cluster_size=4K", src, base])
    im = Image(base)
    ext = im.ext(EXT_DEDUP)
    assert ext, "qcow2dedup convert wrote no dedup extension"
    ext_off, ext_len = ext
    assert ext_len >= 56 and im.autoclear & AUTOCLEAR_DEDUP
    _ver, _alg, idx_off, idx_n, idx_buckets = struct.unpack_from(">IIQQQ", im.data, ext_off)
    assert _ver == 3 and idx_off and idx_n == 5 and idx_buckets == 1, (_ver, idx_off, idx_n, idx_buckets)
    # The table is one bucket: {be16 count, u8 overflowed, 5 zero, 8-byte
    # check}, then entries {be40 fingerprint (the digest's first 5 bytes),
    # be32 host cluster}.
    count = struct.unpack_from(">H", im.data, idx_off)[0]
    assert count == 5
    entries = [(bytes(im.data[idx_off + 16 + 9 * i: idx_off + 21 + 9 * i]),
                struct.unpack_from(">I", im.data, idx_off + 21 + 9 * i)[0]) for i in range(count)]
    host_of = {k: im.host(layout.index(k)) for k in "ABCDE"}
    key = {k: sha256(blocks[k])[:5] for k in "ABCDE"}
    for k_, _c in entries:
        assert k_ in key.values()

    def bucket(es, check=True):
        b = bytearray(struct.pack(">HB5x8x", len(es), 0) + b"".join(k_ + be32(c_) for k_, c_ in es))
        b += b"\x00" * (4096 - len(b))
        if check:
            b[8:16] = sha256(bytes(b))[:8]
        return bytes(b)

    # The write: copies of A, B and D (stored elsewhere) over zero clusters 6-8.
    with open(c.p("write_dedup.bin"), "wb") as f:
        f.write(blocks["A"] + blocks["B"] + blocks["D"])
    wr = ("write_dedup.bin", 6 * CS)

    def lying(name, what, es=None, idx_at=None, n=None, buckets=1, body=None, ext_fields=None, extra_patches=(),
              append=None):
        es = entries if es is None else es
        at = idx_off if idx_at is None else idx_at
        patches = []
        if body is not None or es is not entries or idx_at is not None:
            patches.append((at, body if body is not None else bucket(es)))
        fields = ext_fields or (3, 1, at, len(es) if n is None else n, buckets)
        patches.append((ext_off, struct.pack(">IIQQQ", *fields)))
        patches += list(extra_patches)
        c.add(name, base, what, patches, group="index", write=wr, append=append)

    def remap(k, cluster):
        return [(k_, cluster if k_ == key[k] else c_) for k_, c_ in entries]

    lying("idx_offset_beyond_eof.qcow2", "index offset 1 GiB past the end of the file", idx_at=1 << 30, body=b"")
    lying("idx_offset_huge.qcow2", "index offset 0xfffffffffffff000", ext_fields=(3, 1, 0xFFFFFFFFFFFFF000, 5, 1))
    lying("idx_offset_misaligned.qcow2", "index offset not cluster aligned", ext_fields=(3, 1, idx_off + 8, 5, 1))
    lying("idx_offset_zero_entries.qcow2", "index offset 0 with 5 entries", ext_fields=(3, 1, 0, 5, 1))
    lying("idx_entries_huge.qcow2", "index_entries 2^60", n=1 << 60)
    lying("idx_buckets_overflow.qcow2", "index_buckets 2^52 (times 4096 wraps to 0)", buckets=1 << 52)
    lying("idx_buckets_not_power.qcow2", "index_buckets 3", buckets=3)
    lying("idx_buckets_zero.qcow2", "index_buckets 0 with a table", buckets=0)
    lying("idx_entries_max.qcow2", "index_entries 0xffffffffffffffff", n=0xFFFFFFFFFFFFFFFF)
    lying("idx_entries_more_than_stored.qcow2", "index_entries one more than the table holds", n=idx_n + 1)
    lying("idx_entries_past_bucket.qcow2", "a bucket count of 454 entries",
          body=struct.pack(">H", 454) + bucket(entries)[2:])
    bad_check = bytearray(bucket(entries))
    bad_check[9] ^= 0x5A
    lying("idx_check_wrong.qcow2", "the bucket's check does not match", body=bytes(bad_check))
    lying("idx_hash_algorithm_unknown.qcow2", "hash algorithm 7", ext_fields=(3, 7, idx_off, idx_n, 1))
    lying("idx_version_unknown.qcow2", "extension version 99", ext_fields=(99, 1, idx_off, idx_n, 1))
    lying("idx_version_first.qcow2", "extension version 1 (a sorted array, no longer read)",
          ext_fields=(1, 1, idx_off, idx_n, 1))
    lying("idx_version_second.qcow2", "extension version 2 (160-bit keys, no longer read)",
          ext_fields=(2, 1, idx_off, idx_n, 1))
    lying("idx_points_at_l2.qcow2", "A's entry points at the L2 table (check recomputed)",
          es=remap("A", im.l2_tables[0] // CS))
    lying("idx_points_at_l1.qcow2", "A's entry points at the L1 table (check recomputed)", es=remap("A", im.l1_offset // CS))
    lying("idx_points_at_refblock.qcow2", "A's entry points at the refcount block (check recomputed)",
          es=remap("A", im.refblocks[0] // CS))
    lying("idx_points_at_reftable.qcow2", "A's entry points at the refcount table (check recomputed)",
          es=remap("A", im.reftable_offset // CS))
    lying("idx_points_at_header.qcow2", "A's entry points at cluster 0 (check recomputed)", es=remap("A", 0))
    lying("idx_points_into_index.qcow2", "A's entry points at the index itself (check recomputed)",
          es=remap("A", idx_off // CS))
    lying("idx_points_past_eof.qcow2", "A's entry points at cluster 2^32-1, far past the end (check recomputed)",
          es=remap("A", 0xFFFFFFFF))
    lying("idx_wrong_data.qcow2", "A's entry points at C's cluster (check recomputed)", es=remap("A", host_of["C"] // CS))
    both = [(k_, host_of["D"] // CS if k_ == key["A"] else host_of["E"] // CS if k_ == key["B"] else c_)
            for k_, c_ in entries]
    lying("idx_wrong_data_b.qcow2", "A's entry points at D's cluster, B's at E's (check recomputed)", es=both)
    # An extra entry for A, pointing at B's cluster, after the real one.
    lying("idx_duplicate_key.qcow2", "a second entry for A points at B's cluster (check recomputed)",
          es=entries + [(key["A"], host_of["B"] // CS)])
    # The index moved one cluster further, A's entry pointing at the free (refcount 0) cluster in between.
    gap = (idx_off // CS) * CS
    lying("idx_points_at_free_cluster.qcow2", "A's entry points at a refcount-0 cluster below the index",
          es=remap("A", gap // CS), idx_at=gap + CS, extra_patches=[(gap, b"\x00" * CS)])
    # Stale data: A's cluster overwritten in place (not through the image), index still "in sync".
    lying("idx_stale_data.qcow2", "A's cluster holds other bytes than the index says",
          extra_patches=[(host_of["A"], bytes(rng.getrandbits(8) for _ in range(CS)))])
    # The index placed over the L2 table.
    lying("idx_offset_at_l2.qcow2", "index offset is the L2 table", ext_fields=(3, 1, im.l2_tables[0], 5, 1))
    lying("idx_all_point_at_c.qcow2", "every entry points at C's cluster (check recomputed)",
          es=[(k_, host_of["C"] // CS) for k_, _c in entries])
    # Our extension too short to hold its fields (the extensions after it
    # moved up), autoclear set.
    exts = []
    for m, off, length in im.exts:
        payload = bytes(im.data[off: off + length])
        exts.append((m, payload[:40] if m == EXT_DEDUP else payload))
    c.add("idx_ext_short.qcow2", base, "our extension cut to 40 bytes", [(im.header_length, encode_exts(exts, CS - im.header_length))],
          group="index", write=wr)
    # Our extension present but the image dirty (a crash): the index must not be used.
    # Not only the index: a dirty image may be refused by write.
    c.add("idx_dirty_image.qcow2", base, "dirty bit set with the index in sync (check recomputed, A -> C)",
          [(idx_off, bucket(remap("A", host_of["C"] // CS))), (OFF_INCOMPAT, be64(1))], write=wr)
    # Refcount of A's cluster at the maximum: sharing must not overflow it.
    lying("idx_refcount_at_max.qcow2", "A's cluster has refcount 0xffff (leak; sharing must not overflow)",
          extra_patches=[(im.refcount_entry_offset(host_of["A"] // CS), be16(0xFFFF))])
    return base


def main():
    args = sys.argv[1:]
    tool = os.environ.get("QCOW2DEDUP")
    if "--tool" in args:
        i = args.index("--tool")
        tool = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    outdir = args[0]
    if not tool:
        here = os.path.dirname(os.path.abspath(__file__))
        tool = os.path.join(here, "..", "..", "build", "apps", "qcow2dedup")
    os.makedirs(outdir, exist_ok=True)
    c = Corpus(outdir, tool)
    plain, snap, comp, comp2, zstd, big, bitmap = build_qemu_bases(c)
    header_cases(c, plain)
    metadata_cases(c, plain, big)
    snapshot_cases(c, snap)
    compressed_cases(c, comp, comp2, zstd)
    backing_cases(c, plain)
    bitmap_cases(c, bitmap)
    dedup_cases(c)
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        json.dump(c.manifest, f, indent=1)
    shutil.rmtree(c.work)
    print("%d hostile files in %s" % (len(c.manifest), outdir))


if __name__ == "__main__":
    main()
