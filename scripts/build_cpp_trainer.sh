#!/usr/bin/env bash
# Builds and installs tessera's C++ libraries with torch (Tessera::torch, the C++ trainer API) into
# build/cpp-torch/prefix, then builds examples/cpp/llama_trainer against that installed package with
# find_package(Tessera), as a user's trainer is built. Prints the trainer's path. Needs scripts/setup.sh first
# (the venv's torch provides libtorch and its CMake config), or PYTHON=<a python with torch>.
# The package must be relocatable (issue 17): it is configured for one prefix, installed with --prefix into another
# and moved after that; the trainer is built against the moved tree and must find everything there (the gloo
# plugin included). tests/python/cpp/test_cpp_trainer.py runs this trainer as 2 gloo ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/relocation_checks.sh
PY="${PYTHON:-$PWD/.venv/bin/python}"  # the python whose torch provides libtorch (gpu_check.sh passes its own)
PREFIX="$PWD/build/cpp-torch/prefix"
CONFIGURED="$PWD/build/cpp-torch/configured-prefix"  # CMAKE_INSTALL_PREFIX at configure time; never written
STAGED="$PWD/build/cpp-torch/staged-prefix"           # where it is installed, then moved from to $PREFIX
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
cmake -S . -B build/cpp-torch/lib -G Ninja -DCMAKE_BUILD_TYPE=Release -DTESSERA_WITH_TORCH=ON \
  -DPython_EXECUTABLE="$PY" -DCMAKE_INSTALL_PREFIX="$CONFIGURED" >/dev/null
cmake --build build/cpp-torch/lib -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
rm -rf "$STAGED" "$PREFIX"
cmake --install build/cpp-torch/lib --prefix "$STAGED" >/dev/null
mv "$STAGED" "$PREFIX"
check_no_baked_paths "$PREFIX" "$CONFIGURED" "$STAGED" "$PWD/build/cpp-torch/lib"
# Nor may its CMake files name this clone or this build's torch (a venv): consumers find their own torch.
TORCH_DIR=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
check_no_baked_paths "$PREFIX"/lib*/cmake "$PWD" "$TORCH_DIR"
cmake -S examples/cpp/llama_trainer -B build/llama_trainer -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_PREFIX" >/dev/null
cmake --build build/llama_trainer -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "$PWD/build/llama_trainer/llama_trainer"
