#!/usr/bin/env bash
# Unpacks the Debian packages the GPU machine lacks into .deps/ at the repo root (git-ignored), for
# scripts/gpu_check.sh to put on CMAKE_PREFIX_PATH / LD_LIBRARY_PATH there. Run here (Debian 12), then carry .deps
# to the GPU machine. The GPU machine has no network, so everything it needs must be in these packages:
#   Abseil (libabsl-dev + the shared libs it links, libabsl20220623), xxHash (libxxhash-dev + libxxhash0),
#   nlohmann json (nlohmann-json3-dev, header-only: checkpoint manifests), and
#   GoogleTest (libgtest-dev, libgmock-dev: static libs + CMake config) in case that machine has none.
# Debian's CMake package files compute their prefix from their own location, so the unpacked tree is relocatable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.deps"
PACKAGES=(libabsl-dev libabsl20220623 libxxhash-dev libxxhash0 nlohmann-json3-dev libgtest-dev libgmock-dev)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# apt-get download drops privileges to _apt, which must be able to write the folder.
chmod 777 "$tmp"
if ! (cd "$tmp" && apt-get download "${PACKAGES[@]}"); then
  echo "apt-get download failed; if the package lists are missing, run 'apt-get update' first" >&2
  exit 1
fi

rm -rf "$DEST"
mkdir -p "$DEST"
for deb in "$tmp"/*.deb; do
  echo "unpacking $(basename "$deb")"
  dpkg -x "$deb" "$DEST"
done
# Documentation is dead weight on the way to the GPU machine (carry is limited to 64 MiB).
rm -rf "$DEST/usr/share/doc" "$DEST/usr/share/lintian"

test -f "$DEST/usr/lib/x86_64-linux-gnu/cmake/absl/abslConfig.cmake"
test -f "$DEST/usr/include/xxhash.h"
test -f "$DEST/usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake"
test -f "$DEST/usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake"
echo "unpacked into $DEST ($(du -sh "$DEST" | cut -f1))"
