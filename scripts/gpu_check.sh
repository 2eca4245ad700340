#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called indirectly, through run_step
# The one command to run on a lent GPU machine (H100/H200; torch 2.11.0+cu130, Python 3.12, CMake 4.4, GCC 13,
# nvcc 13.0, NCCL; no network, no Abseil/xxHash). Steps, each logged to its own file:
#   cpp     configure + build the C++ tests with CUDA in build-gpu/, run ctest (includes cuda_kernels_test)
#   python  build and install the Python package (pip, scikit-build-core, against the installed torch), import it
#   bench   python benchmarks/gpu_bench.py (skipped with a message while it does not exist)
#   recipe  `tessera run` of the SmolLM2 full-SFT recipe on the GPU (bf16, NCCL, world size 1) on a random-init
#           SmolLM2-135M written there, then benchmarks/sft.py (the same SFT with transformers + FSDP2 fully_shard);
#           needs .gpu_inputs/ (made here by scripts/fetch_gpu_inputs.sh, carried): smollm2-tok/ (config.json +
#           tokenizer files) and cache/data/chatterbot-corpus
#           (a copy of ~/.cache/tessera/data/chatterbot-corpus), since that machine has no network.
#   resilience  the NCCL watchdog test (nccl_watchdog_test: a world-size-1 collective held past its deadline by
#           work on its stream is reported and aborted) and `tessera doctor` on the GPU (GEMM, memory test, H2D/D2H,
#           NCCL busbw, NVML); needs the python step's install (and build-gpu/ from the cpp step for the C++ test)
#   trainer the C++ trainer (examples/cpp/llama_trainer, built against the installed package by
#           scripts/build_cpp_trainer.sh) at world size 1 on NCCL: 8 steps of a tiny random Llama on one repeated
#           window; its loss must fall
# Usage: scripts/gpu_check.sh [cpp] [python] [bench] [recipe] [resilience] [trainer]
#        (no argument: cpp python bench, in that order)
#   CPP_TARGETS="cuda_kernels_test comm_test"  builds only those targets (default: all);
#   CTEST_REGEX="Cuda|Nccl"                   runs only the matching tests (default: all);
#   BENCH_ARGS="--skip-checkpoint"            passes arguments to gpu_bench.py;
#   RECIPE_BENCH=0                            runs the recipe without benchmarks/sft.py.
# Abseil, xxHash and GoogleTest come from .deps/ (made here by scripts/fetch_gpu_deps.sh, carried along).
# Logs go to $OUT when set (the folder that comes back from the machine), else gpu-check-logs/. Exit status 1 if a
# step failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
LOG_DIR="${OUT:-$ROOT/gpu-check-logs}"
mkdir -p "$LOG_DIR"
JOBS="${JOBS:-16}"
PYTHON="${PYTHON:-python3}"
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(cpp python bench)

# ---- environment: every override in this one place ---------------------------------------------------------------
DEPS="$ROOT/.deps/usr"
DEPS_LIB="$DEPS/lib/x86_64-linux-gnu"
if [[ -d "$DEPS" ]]; then
  export CMAKE_PREFIX_PATH="$DEPS:$DEPS_LIB/cmake${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  # find_library/find_path do not look in lib/x86_64-linux-gnu unless CMake detected a Debian multiarch compiler.
  export CMAKE_LIBRARY_PATH="$DEPS_LIB${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}"
  export CMAKE_INCLUDE_PATH="$DEPS/include${CMAKE_INCLUDE_PATH:+:$CMAKE_INCLUDE_PATH}"
  export LD_LIBRARY_PATH="$DEPS_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # Abseil and xxHash are shared libraries
else
  echo "warning: $DEPS is missing (run scripts/fetch_gpu_deps.sh and carry .deps); using whatever is installed"
fi
if [[ -z "${CUDACXX:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDACXX=/usr/local/cuda/bin/nvcc; fi
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
# find_package(Torch) adds -gencode flags for every architecture it autodetects (or a list starting at sm_50, which
# nvcc 13 rejects, where detection fails) to the directory's CUDA flags; pin them to what CMakeLists.txt builds.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"

# ---- step runner ---------------------------------------------------------------------------------------------------
SUMMARY=()
FAILED=0
# run_step NAME COMMAND...: runs COMMAND with its output in $LOG_DIR/NAME.log; on failure prints the log's tail.
run_step() {
  local name="$1"; shift
  local log="$LOG_DIR/$name.log" start=$SECONDS rc
  echo "== $name (log: $log)"
  "$@" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  if [[ $rc -eq 0 ]]; then
    SUMMARY+=("$(printf '%-16s ok       %4ds' "$name" "$took")")
  else
    FAILED=1
    SUMMARY+=("$(printf '%-16s FAILED   %4ds  (exit %d, see %s.log)' "$name" "$took" "$rc" "$name")")
    echo "-- last lines of $log:"
    tail -n 40 "$log"
  fi
  return "$rc"
}
skip_step() {
  SUMMARY+=("$(printf '%-16s skipped        %s' "$1" "$2")")
  echo "== $1 skipped: $2"
}

environment() (  # a subshell, so set -x stays inside
  set -x
  nvidia-smi || true
  "${CUDACXX:-nvcc}" --version || true
  cmake --version
  g++ --version | head -1
  "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || true
  find "$DEPS_LIB" -maxdepth 1 -name "libabsl_status*" 2>/dev/null || true
)

cpp_configure() {
  cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTESSERA_BUILD_TESTS=ON -DTESSERA_WITH_TORCH=OFF \
    -DTESSERA_WITH_CUDA=ON
}
cpp_build() {
  local targets=()
  for t in ${CPP_TARGETS:-}; do targets+=(--target "$t"); done
  cmake --build build-gpu -j "$JOBS" "${targets[@]}"
}
cpp_test() {
  # Tests share the one GPU; a few at a time keeps the run short without starving the multi-threaded CPU tests.
  local filter=()
  [[ -n "${CTEST_REGEX:-}" ]] && filter=(-R "$CTEST_REGEX")
  ctest --test-dir build-gpu --output-on-failure -j 4 --timeout 120 "${filter[@]}" \
    --output-junit "$LOG_DIR/ctest-junit.xml"
  local rc=$?
  cp build-gpu/Testing/Temporary/LastTest.log "$LOG_DIR/ctest-LastTest.log" 2>/dev/null || true
  return "$rc"
}

python_install() {
  # No network: no build isolation and no dependencies; torch, scikit-build-core and pybind11 are already there.
  # pyproject.toml's build-dir (build/<wheel tag>) keeps the CMake tree, so a rerun on a warm machine is incremental.
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -v \
    --config-settings=cmake.define.TESSERA_WITH_CUDA=ON .
}
python_import() {
  # From outside the tree, so the installed package is what gets imported.
  (cd /tmp && "$PYTHON" -c "import torch, tessera, tessera._C as C; print('tessera from', tessera.__file__); \
f = getattr(C, 'cuda_built', None); print('CUDA kernels built:', f() if callable(f) else f)")
}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
bench() { PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_bench.py ${BENCH_ARGS:-}; }

RECIPE_MODEL=/tmp/tessera-smollm2-random
recipe_model() {
  # A random-init SmolLM2-135M in HF format (transformers' init, std 0.02) with the real tokenizer.
  "$PYTHON" - "$ROOT/.gpu_inputs/smollm2-tok" "$RECIPE_MODEL" <<'PY'
import shutil, sys, torch, transformers
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = transformers.AutoConfig.from_pretrained(src)
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
    try:
        shutil.copy(f"{src}/{f}", dst)
    except FileNotFoundError:
        pass
print("wrote", dst)
PY
}
recipe_run() {
  PYTHONUNBUFFERED=1 TESSERA_CACHE_DIR="$ROOT/.gpu_inputs/cache" "$PYTHON" -m tessera run \
    recipes/smollm2_135m_full_sft.yaml model.fetch= model.hf_dir="$RECIPE_MODEL" parallelism.device=cuda \
    parallelism.world_size=1 data.seq_len=1024 training.batch_size=8 training.grad_accum=1 training.steps=40 \
    training.lr=3e-4 training.eval_every=20 checkpoint.every=20 metrics.max_new_tokens=16 \
    output_dir=/tmp/tessera-recipe-run
  local rc=$?
  cp /tmp/tessera-recipe-run/metrics.jsonl "$LOG_DIR/recipe_metrics.jsonl" 2>/dev/null
  return "$rc"
}
recipe_bench() {
  PYTHONUNBUFFERED=1 TESSERA_CACHE_DIR="$ROOT/.gpu_inputs/cache" "$PYTHON" benchmarks/sft.py --device cuda \
    --world 1 --model-dir "$RECIPE_MODEL" --batch 8 --seq 1024 --steps 10 --warmup 3 --out "$LOG_DIR/sft_gpu.md"
}

resilience_watchdog() { ./build-gpu/tests/cpp/nccl_watchdog_test; }
resilience_doctor() {
  mkdir -p /tmp/tessera-doctor
  PYTHONUNBUFFERED=1 "$PYTHON" -m tessera doctor --device cuda --checkpoint-dir /tmp/tessera-doctor \
    --json "$LOG_DIR/doctor.json"
}

trainer_build() { PYTHON="$PYTHON" bash scripts/build_cpp_trainer.sh; }
trainer_run() {
  local d=/tmp/tessera-cpp-trainer
  rm -rf "$d" && mkdir -p "$d"
  # One 65-token window repeated: a model that trains memorizes it, so the loss must fall within 8 steps.
  PYTHONPATH="$ROOT/tests/python/cpp" "$PYTHON" -c "import sys; from pathlib import Path; import numpy as np; \
import trainer_runs as t; d = Path(sys.argv[1]); t.make_hf_dir(d / 'hf'); \
np.tile(np.random.default_rng(0).integers(0, 250, 65, dtype=np.uint32), 32).astype('<u4').tofile(d / 'tokens.bin')" \
    "$d" || return 1
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 ./build/llama_trainer/llama_trainer \
    --hf-dir "$d/hf" --tokens "$d/tokens.bin" --steps 8 --batch 4 --seq 64 --lr 3e-3 | tee "$LOG_DIR/trainer.txt"
  "$PYTHON" -c "import re, sys; l = [float(x) for x in re.findall(r'^step \d+ loss (\S+)$', open(sys.argv[1]).read(), re.M)]; \
print('losses', l); sys.exit(0 if len(l) == 8 and l[-1] < l[0] - 0.05 else 1)" "$LOG_DIR/trainer.txt"
}

# ---- run -----------------------------------------------------------------------------------------------------------
run_step environment environment
for step in "${STEPS[@]}"; do
  case "$step" in
    cpp)
      if run_step cpp-configure cpp_configure && run_step cpp-build cpp_build; then
        run_step cpp-test cpp_test
      else
        skip_step cpp-test "the build failed"
      fi
      ;;
    python)
      if [[ ! -f pyproject.toml ]]; then
        skip_step python "no pyproject.toml in the tree"
      elif run_step python-install python_install; then
        run_step python-import python_import
      else
        skip_step python-import "the install failed"
      fi
      ;;
    bench)
      if [[ -f benchmarks/gpu_bench.py ]]; then
        run_step bench bench
      else
        skip_step bench "benchmarks/gpu_bench.py does not exist yet"
      fi
      ;;
    recipe)
      if [[ ! -d .gpu_inputs/smollm2-tok ]]; then
        skip_step recipe ".gpu_inputs/smollm2-tok is missing (carry .gpu_inputs)"
      elif run_step recipe-model recipe_model; then
        run_step recipe-run recipe_run
        if [[ "${RECIPE_BENCH:-1}" == 1 ]]; then run_step recipe-bench recipe_bench; fi
      fi
      ;;
    resilience)
      if [[ -x build-gpu/tests/cpp/nccl_watchdog_test ]]; then
        run_step resilience-watchdog resilience_watchdog
      else
        skip_step resilience-watchdog "build-gpu/tests/cpp/nccl_watchdog_test is missing (run the cpp step first)"
      fi
      run_step resilience-doctor resilience_doctor
      ;;
    trainer)
      if run_step trainer-build trainer_build; then
        run_step trainer-run trainer_run
      else
        skip_step trainer-run "the build failed"
      fi
      ;;
    *)
      echo "unknown step '$step' (expected cpp, python, bench, recipe, resilience or trainer)" >&2
      exit 2
      ;;
  esac
done

{
  echo "gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  printf '%s\n' "${SUMMARY[@]}"
  if [[ -f "$LOG_DIR/cpp-test.log" ]]; then grep -E "tests passed|tests failed" "$LOG_DIR/cpp-test.log" || true; fi
} | tee "$LOG_DIR/summary.txt"
exit $FAILED
