#!/usr/bin/env bash
# Builds and installs tessera's C++ libraries with torch (Tessera::torch, the C++ trainer API) into
# build/cpp-torch/prefix, then builds examples/cpp/llama_trainer against that installed package with
# find_package(Tessera), as a user's trainer is built. Prints the trainer's path. Needs scripts/setup.sh first
# (the venv's torch provides libtorch and its CMake config), or PYTHON=<a python with torch>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"  # the python whose torch provides libtorch (gpu_check.sh passes its own)
PREFIX="$PWD/build/cpp-torch/prefix"
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
cmake -S . -B build/cpp-torch/lib -G Ninja -DCMAKE_BUILD_TYPE=Release -DTESSERA_WITH_TORCH=ON \
  -DPython_EXECUTABLE="$PY" -DCMAKE_INSTALL_PREFIX="$PREFIX" >/dev/null
cmake --build build/cpp-torch/lib -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
cmake --install build/cpp-torch/lib >/dev/null
cmake -S examples/cpp/llama_trainer -B build/llama_trainer -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_PREFIX" >/dev/null
cmake --build build/llama_trainer -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "$PWD/build/llama_trainer/llama_trainer"
