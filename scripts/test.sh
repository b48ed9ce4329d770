#!/usr/bin/env bash
# Install everything (rayconv + the MaxText 0.2.4 and 0.2.5 references) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --reference
export RAYCONV_REF_PYTHON=${RAYCONV_REF_PYTHON:-$PWD/.venvs/ref/bin/python}
export RAYCONV_MAXTEXT_PATH=${RAYCONV_MAXTEXT_PATH:-$PWD/.venvs/maxtext-0.2.4}
export RAYCONV_MAXTEXT_025_PATH=${RAYCONV_MAXTEXT_025_PATH:-$PWD/.venvs/maxtext-0.2.5}
export JAX_PLATFORMS=cpu RAY_USAGE_STATS_ENABLED=0
.venvs/main/bin/ruff check rayconv tests scripts tools
exec .venvs/main/bin/python -m pytest "$@"
