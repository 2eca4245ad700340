#!/usr/bin/env bash
# Runs every test: the C++ suite (GoogleTest via ctest) and the Python suite (pytest, real gloo ranks).
# Installs and builds what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v ccache >/dev/null; then  # as in scripts/setup.sh
  export CMAKE_C_COMPILER_LAUNCHER=${CMAKE_C_COMPILER_LAUNCHER:-ccache} CMAKE_CXX_COMPILER_LAUNCHER=${CMAKE_CXX_COMPILER_LAUNCHER:-ccache}
  export CMAKE_CUDA_COMPILER_LAUNCHER=${CMAKE_CUDA_COMPILER_LAUNCHER:-ccache}
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}  # paths relative to the clone: another clone's build hits the cache
fi

echo "== C++ tests (ctest; the Google Benchmark programs in benchmarks/cpp are built too, so they keep compiling)"
cmake -S . -B build/cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DTESSERA_BUILD_TESTS=ON -DTESSERA_WITH_TORCH=OFF \
  -DTESSERA_BUILD_BENCHMARKS=ON -DPython_EXECUTABLE="$PWD/.venv/bin/python" >/dev/null
cmake --build build/cpp -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
ctest --test-dir build/cpp --output-on-failure -j 2

echo "== C++ tests of the torch C++ (ctest in the pip build directory, built by scripts/setup.sh)"
py_tag=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
torch_build=$(ls -d build/"$py_tag"-* 2>/dev/null | head -n 1)
if [[ -z "$torch_build" || ! -f "$torch_build/tests/cpp/torch/CTestTestfile.cmake" ]]; then
  echo "test: no torch C++ tests in build/<wheel tag>/tests/cpp/torch; scripts/setup.sh should have built them" >&2
  exit 1
fi
ctest --test-dir "$torch_build" --output-on-failure -j 2

echo "== CMake package for C++ trainers (find_package(Tessera))"
bash scripts/check_cmake_package.sh

echo "== C++ trainer: the C++ libraries with torch installed into a prefix, examples/cpp/llama_trainer built against it"
bash scripts/build_cpp_trainer.sh

echo "== Fuzzing the checkpoint manifest and file-header parsers (libFuzzer, ${TESSERA_FUZZ_SECONDS:-30} s)"
bash scripts/fuzz.sh "${TESSERA_FUZZ_SECONDS:-30}"

echo "== Python tests (pytest)"
.venv/bin/python -m pytest tests/python -q -p no:cacheprovider --durations=30 "$@"
