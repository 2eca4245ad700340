#!/usr/bin/env bash
# Trains the embedded demo (a tiny Llama-like model on 2 CPU ranks with tessera), printing loss and tokens/s.
# Extra arguments go to `tessera run`: a recipe file and/or key=value overrides, e.g. `scripts/run.sh steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tessera run "$@"
