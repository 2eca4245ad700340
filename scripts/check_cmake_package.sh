#!/usr/bin/env bash
# Checks the CMake package C++ trainers use: builds and installs the torch-free core into a temporary prefix, then
# configures, builds and runs tests/cpp/package (find_package(Tessera) + Tessera::core; when the package has gloo,
# Tessera::gloo and the isolated plugin Tessera::gloo_plugin, loaded from its default installed path).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/package-check
rm -rf "$OUT"
cmake -S . -B "$OUT/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTESSERA_WITH_TORCH=OFF -DTESSERA_WITH_CUDA=OFF \
  -DCMAKE_INSTALL_PREFIX="$PWD/$OUT/prefix" >/dev/null
# Every library target (tessera_core, and tessera_gloo + tessera_gloo_plugin when libgloo is found); tests and
# torch are off.
cmake --build "$OUT/lib" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >/dev/null
cmake --install "$OUT/lib" >/dev/null
cmake -S tests/cpp/package -B "$OUT/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$OUT/prefix" >/dev/null
cmake --build "$OUT/consumer" >/dev/null
"$OUT/consumer/consumer"
