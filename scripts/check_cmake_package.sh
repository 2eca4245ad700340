#!/usr/bin/env bash
# Checks the CMake package C++ trainers use: builds and installs the torch-free core, then configures, builds and
# runs tests/cpp/package (find_package(Tessera) + Tessera::core; when the package has gloo, Tessera::gloo and the
# isolated plugin Tessera::gloo_plugin, found where the library looks by default: a 2-rank all-reduce through it).
# The package must be relocatable (issue 17): it is configured for one prefix, installed with --prefix into
# another and moved after that, and the consumer built against the moved tree. Then the consumer is installed into
# that tree's bin/ and the whole tree moved once more, so the plugin must be found next to the binary (the RUNPATH
# that find_package(Tessera) gave it now points to a tree that is gone).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/relocation_checks.sh
OUT=build/package-check
rm -rf "$OUT"
CONFIGURED="$PWD/$OUT/configured-prefix"  # CMAKE_INSTALL_PREFIX at configure time; never written
cmake -S . -B "$OUT/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTESSERA_WITH_TORCH=OFF -DTESSERA_WITH_CUDA=OFF \
  -DCMAKE_INSTALL_PREFIX="$CONFIGURED" >/dev/null
# Every library target (tessera_core, and tessera_gloo + tessera_gloo_plugin when libgloo is found); tests and
# torch are off.
cmake --build "$OUT/lib" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >/dev/null
cmake --install "$OUT/lib" --prefix "$OUT/staged" >/dev/null
mv "$OUT/staged" "$OUT/prefix"
check_no_baked_paths "$OUT/prefix" "$CONFIGURED" "$PWD/$OUT/staged" "$PWD/$OUT/lib"
check_no_baked_paths "$OUT"/prefix/lib*/cmake "$PWD"  # nor may its CMake files name this clone
cmake -S tests/cpp/package -B "$OUT/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$OUT/prefix" >/dev/null
cmake --build "$OUT/consumer" >/dev/null
"$OUT/consumer/consumer"
if compgen -G "$OUT/prefix/lib*/libtessera_gloo_plugin.so" >/dev/null; then
  mkdir -p "$OUT/prefix/bin"
  cp "$OUT/consumer/consumer" "$OUT/prefix/bin/"
  mv "$OUT/prefix" "$OUT/moved"
  "$OUT/moved/bin/consumer" "$(realpath "$OUT"/moved/lib*/libtessera_gloo_plugin.so)"
fi
