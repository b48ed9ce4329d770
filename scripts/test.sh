#!/usr/bin/env bash
# Install everything (rayconv + the MaxText 0.2.4 and 0.2.5 references) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
# Two workers, a test file each at a time (pytest-xdist --dist loadfile): the suite mostly waits (MaxText
# runs, Ray starts, servers), so two files at once use the two cores. RAYCONV_TEST_WORKERS=0 runs it serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --reference
export RAYCONV_REF_PYTHON=${RAYCONV_REF_PYTHON:-$PWD/.venvs/ref/bin/python}
export RAYCONV_MAXTEXT_PATH=${RAYCONV_MAXTEXT_PATH:-$PWD/.venvs/maxtext-0.2.4}
export RAYCONV_MAXTEXT_025_PATH=${RAYCONV_MAXTEXT_025_PATH:-$PWD/.venvs/maxtext-0.2.5}
export JAX_PLATFORMS=cpu RAY_USAGE_STATS_ENABLED=0
.venvs/main/bin/ruff check rayconv tests scripts tools
WORKERS=${RAYCONV_TEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then exec .venvs/main/bin/python -m pytest "$@"; fi
exec .venvs/main/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
