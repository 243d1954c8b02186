#!/usr/bin/env bash
# Installs, builds and runs every test: unit and interop tests (stock QEMU
# tools as judges, the Debian corpus disks) in build/ (g++); then the same
# suite built by clang with AddressSanitizer and UndefinedBehaviorSanitizer
# in build-asan/ (the interop tests spawn the sanitized binary); then a
# bounded libFuzzer run of every tests/fuzz target (.ci/fuzz.sh,
# FUZZ_SECONDS each, default 90). Sanitizer reports (leaks included) go to
# files in build-asan/sanitizer-logs/, and any file there fails the run, so
# a report from a child process whose failure a test expected still counts.
# Ends with the numbers the suite counted (fault points, kills, hostile
# files and runs, fuzz executions) and the time each phase took.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
phase() { echo "== test.sh: $1 ($((SECONDS - t0))s so far)" >&2; }
bash .ci/install-deps.sh
export QCOW2DEDUP_CORPUS=${QCOW2DEDUP_CORPUS:-/var/tmp/qcow2dedup-corpus}
if [ ! -f "$QCOW2DEDUP_CORPUS/vmfarm.raw" ] || [ ! -f "$QCOW2DEDUP_CORPUS/vm-a.raw" ]; then
  phase "building the corpus"
  bash ../shared/corpus/make-corpus.sh "$QCOW2DEDUP_CORPUS" >&2
fi

phase "build/"
bash .ci/build.sh build
s=$SECONDS
ctest --test-dir build --output-on-failure -j2
suite_time=$((SECONDS - s))

# clang, not g++: with g++'s separate libubsan, UBSan reports ignore log_path
# and go to stderr, where a test that expects a child to fail never looks.
phase "build-asan/ (-DQCOW2DEDUP_SANITIZE=ON, clang)"
bash .ci/build.sh build-asan -DQCOW2DEDUP_SANITIZE=ON -DCMAKE_CXX_COMPILER=clang++
logs=$PWD/build-asan/sanitizer-logs
rm -rf "$logs"; mkdir -p "$logs"
s=$SECONDS
asan_rc=0
ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:print_stacktrace=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:log_path=$logs/asan" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  ctest --test-dir build-asan --output-on-failure -j2 || asan_rc=$?
asan_time=$((SECONDS - s))
if compgen -G "$logs/*" >/dev/null; then
  for f in "$logs"/*; do echo "---- $f" >&2; cat "$f" >&2; done
  echo "test.sh: the sanitizers reported errors (above)" >&2
  exit 1
fi
[ "$asan_rc" -eq 0 ] || { echo "test.sh: the suite failed under the sanitizers" >&2; exit "$asan_rc"; }

phase "fuzzing"
s=$SECONDS
fuzz_out=$(FUZZ_SECONDS=${FUZZ_SECONDS:-90} bash .ci/fuzz.sh)
fuzz_time=$((SECONDS - s))

echo "== test.sh: numbers"
log=build/Testing/Temporary/LastTest.log
grep -h -E 'fault points injected in all|write points, .* sync points' "$log" | sed 's/^.*MESSAGE: *//' | sort -u || true
grep -h -E '^(convert|write), .* kills \(' "$log" | sort -u || true
grep -h -E '^hostile corpus: ' "$log" | sort -u || true
echo "$fuzz_out"
echo "suite ${suite_time}s, suite under ASan+UBSan ${asan_time}s, fuzzing ${fuzz_time}s, all $((SECONDS - t0))s"
