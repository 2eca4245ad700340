#!/usr/bin/env bash
# Installs everything tessera needs on a fresh Debian 12 machine and builds it:
#   apt packages (compiler, CMake, Ninja, Abseil, xxHash, GoogleTest, Google Benchmark, Python venv),
#   a virtual environment .venv with torch==2.11.0, and the tessera extension built against that torch.
# Idempotent: a second run only rebuilds what changed. Set TESSERA_SKIP_APT=1 to skip the apt step.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential cmake ninja-build git pkg-config clang libclang-rt-14-dev e2fsprogs libabsl-dev libxxhash-dev nlohmann-json3-dev libgtest-dev libbenchmark-dev libgloo-dev
              python3 python3-venv python3-dev slurm-wlm munge ccache)
if [[ "${TESSERA_SKIP_APT:-0}" != "1" ]]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    echo "setup: installing apt packages: ${missing[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.11.0')" 2>/dev/null; then
  echo "setup: installing torch==2.11.0 and Python dependencies (about 3 GB on first install)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.11.0"
fi
# transformers/tokenizers/gguf: the HF model layer (tessera.models: tokenizers, `tessera fetch`'s GGUF conversion)
# and the logit-parity tests against transformers. tiktoken, sentencepiece and protobuf: `tessera fetch`'s Llama 3
# (tiktoken BPE) and Mistral (SentencePiece model, a protobuf) tokenizer conversions and their reference tests.
# peft: tessera.peft's adapter export is checked by loading it with peft (tests/python/peft).
# matplotlib, tensorboard, tqdm: tessera.metrics (`tessera plot`'s PNGs, the TensorBoard event file next to
# metrics.jsonl, and the progress bar of `tessera run`); tests/python/metrics reads the PNGs and events back.
# nvidia-ml-py (module pynvml): the GPUs' energy counters (tessera.metrics.energy); without a driver it raises
# NVMLError_LibraryNotFound and the GPU energy is simply not measured.
# kubeflow-training, kubeflow-trainer-api, jsonschema: tests/python/recipes/test_k8s.py validates the rendered
# PyTorchJob and JobSet manifests against schemas built from the Kubeflow SDKs' models (no registry ships the CRDs).
.venv/bin/pip install -q numpy pyyaml pytest safetensors "scikit-build-core>=0.10" \
  "transformers>=5.20,<6" "tokenizers>=0.22" "gguf==0.19.0" "tiktoken>=0.7" "sentencepiece>=0.2" protobuf \
  "peft==0.21.2" "matplotlib>=3.8" "tensorboard>=2.15" "tqdm>=4.60" "nvidia-ml-py>=12.535" \
  "kubeflow-training==1.9.4" "kubeflow-trainer-api==2.3.0" jsonschema

echo "setup: building tessera (C++ core + Python extension) against the installed torch"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# ccache (in ~/.cache/ccache) makes a rebuild from a fresh clone take seconds instead of minutes: the torch headers
# cost 20-40 s per file on 2 cores. The first build on a machine fills it.
if command -v ccache >/dev/null; then
  export CMAKE_C_COMPILER_LAUNCHER=${CMAKE_C_COMPILER_LAUNCHER:-ccache} CMAKE_CXX_COMPILER_LAUNCHER=${CMAKE_CXX_COMPILER_LAUNCHER:-ccache}
  export CMAKE_CUDA_COMPILER_LAUNCHER=${CMAKE_CUDA_COMPILER_LAUNCHER:-ccache}
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}  # paths relative to the clone: another clone's build hits the cache
fi
# torch's CMake config adds NVCC flags for every architecture it knows unless told; we build sm_80 and sm_90.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
# The C++ tests of the torch C++ (tests/cpp/torch) are built here, in the pip build that compiles tessera_torch
# anyway; scripts/test.sh runs them with ctest in this build directory (build/<wheel tag>, see pyproject.toml).
.venv/bin/pip install -q --no-build-isolation --no-deps -e . --config-settings=cmake.define.TESSERA_BUILD_TORCH_TESTS=ON
.venv/bin/python -c "import tessera; print('setup: tessera', tessera.__version__, 'ready; CUDA kernels built:', tessera._C.cuda_built())"
