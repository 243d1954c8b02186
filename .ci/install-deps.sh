#!/usr/bin/env bash
# Installs what qcow2dedup needs to build and test, from Debian's packages.
# clang builds the sanitizer suite (build-asan) and the fuzz targets;
# libclang-rt-14-dev holds clang 14's sanitizer runtimes and libFuzzer
# (libclang_rt.fuzzer-x86_64.a, libclang_rt.asan-x86_64.a): on Debian 12 it
# is only recommended by clang's dependencies, so it is named here.
# serve runs nbdkit with our plugin (nbdkit-plugin-dev has its header);
# libnbd's tools and library are the tests' NBD clients, fio the benchmark's;
# qemu-system-x86 and busybox-static boot the VM test's guest, whose kernel
# tests/vm/prepare-kernel.sh fetches (cached in /var/tmp/qcow2dedup-vm).
set -euo pipefail
pkgs=(cmake g++ make pkg-config libcli11-dev libfmt-dev libssl-dev doctest-dev zlib1g-dev libzstd-dev
      nlohmann-json3-dev qemu-utils python3 clang libclang-rt-14-dev debootstrap e2fsprogs time bc strace
      nbdkit nbdkit-plugin-dev libnbd-bin libnbd-dev python3-libnbd fio qemu-system-x86 busybox-static)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bash "$(dirname "$0")/../tests/vm/prepare-kernel.sh"
