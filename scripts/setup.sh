#!/usr/bin/env bash
# Install rayconv's environments from the repo's own files.
#   scripts/setup.sh            rayconv itself (.venvs/main, Python >= 3.11)
#   scripts/setup.sh --reference   also MaxText's converters (.venvs/ref, Python 3.12), used by the parity tests
#                                  and the benchmark as the reference implementation: maxtext 0.2.4 (classic
#                                  trees, --maxtext_layout linen) and 0.2.5 (NNX trees, --maxtext_layout nnx),
#                                  each a --no-deps overlay (.venvs/maxtext-<version>) on the one ref env
# Idempotent: an environment whose lock file has not changed is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The reference env alone downloads ~5 GB (PyPI's torch for Python 3.12 is the CUDA build); pip's wheel cache
# would hold a second copy of it. A CI disk ran out of space on exactly that, so nothing is cached.
export PIP_NO_CACHE_DIR=1
VENVS=${RAYCONV_VENVS:-$ROOT/.venvs}
mkdir -p "$VENVS"

find_python() {  # find_python 3.11 -> path of an interpreter of that minor version
  local want=$1 candidate
  for candidate in "python$want" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))"; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

stamp_ok() { [ -f "$1/.rayconv-stamp" ] && [ "$(cat "$1/.rayconv-stamp")" = "$2" ]; }

# --- rayconv (main) ---------------------------------------------------------------------------
MAIN=$VENVS/main
MAIN_STAMP=$(cat pyproject.toml requirements/main.lock | sha256sum | cut -c1-16)
if ! stamp_ok "$MAIN" "$MAIN_STAMP"; then
  PY=$(find_python 3.11 || find_python 3.12 || find_python 3.13) || { echo "setup: need Python >= 3.11" >&2; exit 1; }
  echo "setup: creating $MAIN with $PY"
  rm -rf "$MAIN"; "$PY" -m venv "$MAIN"
  "$MAIN/bin/pip" install -q --upgrade pip
  # torch only writes synthetic checkpoints; pin the CPU build this machine kind carries.
  "$MAIN/bin/pip" install -q -c requirements/main.lock torch
  "$MAIN/bin/pip" install -q -c requirements/main.lock -e ".[test]"
  echo "$MAIN_STAMP" > "$MAIN/.rayconv-stamp"
fi

# --- MaxText reference ------------------------------------------------------------------------
if [ "${1:-}" = "--reference" ]; then
  REF=$VENVS/ref
  MT=$VENVS/maxtext-0.2.4
  REF_STAMP=$(cat requirements/maxtext-ref.lock | sha256sum | cut -c1-16)
  if ! stamp_ok "$REF" "$REF_STAMP"; then
    PY=$(find_python 3.12) || { echo "setup: MaxText needs Python 3.12 (pyenv install 3.12)" >&2; exit 1; }
    echo "setup: creating $REF with $PY (MaxText 0.2.4 reference; a few minutes)"
    rm -rf "$REF" "$MT"; "$PY" -m venv "$REF"
    "$REF/bin/pip" install -q --upgrade pip
    "$REF/bin/pip" install -q -r requirements/maxtext-ref.lock
    # maxtext's wheel declares no dependencies; install it beside, first on PYTHONPATH.
    "$REF/bin/pip" install -q --no-deps --target "$MT" maxtext==0.2.4
    echo "$REF_STAMP" > "$REF/.rayconv-stamp"
  fi
  # maxtext 0.2.5 runs on the same dependency set (measured: orbax-checkpoint 0.12.8 ships the v1 API it imports);
  # its overlay is stamped on its own so adding it never rebuilds the ref env.
  MT5=$VENVS/maxtext-0.2.5
  MT5_STAMP=$(printf '%s maxtext==0.2.5' "$REF_STAMP" | sha256sum | cut -c1-16)
  if ! stamp_ok "$MT5" "$MT5_STAMP"; then
    echo "setup: installing maxtext 0.2.5 into $MT5"
    rm -rf "$MT5"
    "$REF/bin/pip" install -q --no-deps --target "$MT5" maxtext==0.2.5
    echo "$MT5_STAMP" > "$MT5/.rayconv-stamp"
  fi
fi
echo "setup: ok"
