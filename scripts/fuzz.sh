#!/usr/bin/env bash
# Builds the checkpoint parser fuzzer (tests/cpp/fuzz/checkpoint_parse_fuzz.cc: manifest, rank index and data file
# header parsing) with clang's libFuzzer + AddressSanitizer + UBSan, outside the CMake build, and runs it.
# Usage: scripts/fuzz.sh [SECONDS]      (default 30; exit status non-zero if it finds a crash, leak or hang)
# Environment: FUZZ_CXX (default clang++, else clang++-14), FUZZ_JOBS (parallel fuzzing processes, default 1).
# The seed corpus (tests/cpp/fuzz/corpus, valid files written by the format code) is copied into
# build/fuzz/corpus, which grows across runs; crash reproducers land in build/fuzz/ (crash-*, leak-*, timeout-*),
# the full log in build/fuzz/last_run.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_TO_RUN="${1:-30}"
OUT="$ROOT/build/fuzz"
CXX="${FUZZ_CXX:-}"
if [[ -z "$CXX" ]]; then
  for c in clang++ clang++-14; do command -v "$c" >/dev/null && { CXX="$c"; break; }; done
fi
[[ -n "$CXX" ]] || { echo "fuzz.sh: clang++ not found (apt-get install clang)" >&2; exit 2; }
mkdir -p "$OUT/corpus"

# Abseil is a prebuilt (GCC, uninstrumented) library: fine for libFuzzer, and ASan still checks all our code.
ABSL_LIBS="$(pkg-config --libs absl_status absl_statusor absl_str_format absl_strings)"
XXHASH_CFLAGS="$(pkg-config --cflags libxxhash 2>/dev/null || true)"
SOURCES=(
  "$ROOT/tests/cpp/fuzz/checkpoint_parse_fuzz.cc"
  "$ROOT/csrc/tessera/checkpoint/format.cc"
  "$ROOT/csrc/tessera/checkpoint/format_json.cc"
  "$ROOT/csrc/tessera/core/dtype.cc"
)
BIN="$OUT/checkpoint_parse_fuzz"
# Rebuild only when a source changed.
if [[ ! -x "$BIN" ]] || [[ -n "$(find "${SOURCES[@]}" "$ROOT/csrc/tessera/checkpoint" -newer "$BIN" 2>/dev/null)" ]]; then
  echo "fuzz.sh: building $BIN with $CXX"
  # shellcheck disable=SC2086  # the flag lists are meant to split
  "$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$ROOT/csrc" $XXHASH_CFLAGS "${SOURCES[@]}" $ABSL_LIBS -o "$BIN"
fi

cp -n "$ROOT"/tests/cpp/fuzz/corpus/* "$OUT/corpus/" 2>/dev/null || true
echo "fuzz.sh: fuzzing for ${SECONDS_TO_RUN}s"
cd "$OUT"
PARALLEL=()
if [[ "${FUZZ_JOBS:-1}" -gt 1 ]]; then PARALLEL=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
set +e
"$BIN" "$OUT/corpus" \
  -dict="$ROOT/tests/cpp/fuzz/checkpoint.dict" \
  -max_total_time="$SECONDS_TO_RUN" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
  "${PARALLEL[@]}" -print_final_stats=1 >"$OUT/last_run.log" 2>&1
status=$?
set -e
grep -E '^(Done|stat::|==[0-9]+==|SUMMARY)|ERROR|crash|leak|timeout' "$OUT/last_run.log" | tail -n 30
if [[ $status -ne 0 ]]; then
  echo "fuzz.sh: the fuzzer found a problem (exit $status); reproducers in $OUT" >&2
  exit "$status"
fi
echo "fuzz.sh: no crash in ${SECONDS_TO_RUN}s"
