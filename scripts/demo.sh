#!/usr/bin/env bash
# Install rayconv and run the whole job (bf16 scanned + unscanned + int8) on the built-in synthetic
# Llama-3.1-405B-layout checkpoint (16 shards, 8 kv heads), locally, into ./rayconv-output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu RAY_USAGE_STATS_ENABLED=0
.venvs/main/bin/rayconv convert --quantize_type int8 --quantize_weights True "$@"
echo "Output: $PWD/rayconv-output (load_parameters_path=$PWD/rayconv-output/bf16/unscanned/checkpoints/0/items)"
