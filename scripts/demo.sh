#!/usr/bin/env bash
# Install rayconv and run the whole job (bf16 scanned + unscanned + int8) on the built-in synthetic
# Llama-3.1-405B-layout checkpoint (16 shards, 8 kv heads), locally, into ./rayconv-output (or wherever
# --output_directory / --bucket_name say: the last line names what rayconv reported it wrote).
set -euo pipefail
cd "$(dirname "$0")/.."
# RAYCONV_DEMO_SETUP=0: rayconv is installed already (tests run the demo against the checkout's venv).
[ "${RAYCONV_DEMO_SETUP:-1}" = 0 ] || bash scripts/setup.sh
rayconv=.venvs/main/bin/rayconv
[ -x "$rayconv" ] || rayconv=$(command -v rayconv)
export JAX_PLATFORMS=cpu RAY_USAGE_STATS_ENABLED=0
# rayconv prints one "<kind>: <path>" line per output on stdout (logs go to stderr): keep them to name the output.
printed=$(mktemp)
trap 'rm -f "$printed"' EXIT
"$rayconv" convert --quantize_type int8 --quantize_weights True "$@" | tee "$printed"
unscanned=$(sed -n 's/^unscanned: //p' "$printed" | tail -n 1)
if [ -n "$unscanned" ]; then
  echo "Output: ${unscanned%%/bf16/unscanned*} (load_parameters_path=$unscanned)"
fi
