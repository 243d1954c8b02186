#!/usr/bin/env bash
# Installs, builds and runs every test: unit and interop tests (stock QEMU
# tools as judges, the Debian corpus disks), then the same suite under
# AddressSanitizer and UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
export QCOW2DEDUP_CORPUS=${QCOW2DEDUP_CORPUS:-/var/tmp/qcow2dedup-corpus}
if [ ! -f "$QCOW2DEDUP_CORPUS/vmfarm.raw" ] || [ ! -f "$QCOW2DEDUP_CORPUS/vm-a.raw" ]; then
  bash ../shared/corpus/make-corpus.sh "$QCOW2DEDUP_CORPUS" >&2
fi
bash .ci/build.sh build
ctest --test-dir build --output-on-failure -j2
