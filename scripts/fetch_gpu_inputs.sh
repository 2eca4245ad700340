#!/usr/bin/env bash
# Prepares .gpu_inputs/ (git-ignored) for `scripts/gpu_check.sh recipe` on the GPU machine, which has no network:
#   .gpu_inputs/smollm2-tok/     SmolLM2-135M-Instruct's config.json and tokenizer files (3.5 MB; no weights: the
#                                GPU machine writes a random-init model from the config)
#   .gpu_inputs/cache/data/chatterbot-corpus/   the corpus as tessera.data caches it (0.3 MB)
# Run here after scripts/setup.sh, then name .gpu_inputs (and .deps) in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
model_dir=$($PY -m tessera fetch smollm2-135m-instruct --quiet | tail -1)
cache=$($PY -c "from tessera import knobs; print(knobs.load().cache_dir)")
$PY -c "from tessera.data import load_conversations; load_conversations('chatterbot-corpus')"
rm -rf .gpu_inputs
mkdir -p .gpu_inputs/smollm2-tok .gpu_inputs/cache/data
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json; do
  if [[ -f "$model_dir/$f" ]]; then cp "$model_dir/$f" .gpu_inputs/smollm2-tok/; fi
done
cp -a "$cache/data/chatterbot-corpus" .gpu_inputs/cache/data/
echo "wrote .gpu_inputs ($(du -sh .gpu_inputs | cut -f1))"
