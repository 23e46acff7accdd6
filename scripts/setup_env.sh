#!/usr/bin/env bash
# Create (or reuse) the cached fairchem-dens virtual environment and print its path on the
# last line of stdout. Progress goes to stderr.
#
# The venv lives OUTSIDE the checkout, in $FAIRCHEM_DENS_ENV_ROOT (default
# ~/.cache/fairchem-dens), keyed by a hash of the dependency pins (env/constraints.txt and the
# [project] dependencies of pyproject.toml). An unchanged re-run only re-links this checkout
# (`pip install --no-deps -e .`, a few seconds). A cold run takes ~15-35 min on 2 cores, most of
# it compiling torch-scatter and torch-sparse from source (measured: 16 min).
#
# Usage:  venv=$(scripts/setup_env.sh | tail -n 1)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v "$PY" >/dev/null 2>&1; then
  say "ERROR: '$PY' not found. Install Python 3.9-3.12 or set PYTHON=/path/to/python3.11."
  exit 2
fi
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$pyver" in
  3.9|3.10|3.11|3.12) ;;
  *) say "ERROR: Python $pyver found at $(command -v "$PY"); fairchem-core 1.10 / torch 2.4 need Python 3.9-3.12." \
       "Set PYTHON=/path/to/python3.11 and re-run."
     exit 2 ;;
esac

key="$( { echo "py$pyver"; cat "$repo/env/constraints.txt"; \
          "$PY" - "$repo/pyproject.toml" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
# the [project] dependencies and optional-dependencies blocks define the environment
for block in re.findall(r"(?ms)^(dependencies = \[.*?^\]|\[project\.optional-dependencies\].*?(?=^\[))", text):
    print(block)
PYEOF
        } | sha256sum | cut -c1-12)"
root="${FAIRCHEM_DENS_ENV_ROOT:-$HOME/.cache/fairchem-dens}"
venv="$root/venv-py$pyver-$key"
pip_q=(--disable-pip-version-check --progress-bar off)

if [ -f "$venv/.complete" ]; then
  say "reusing cached environment $venv"
  "$venv/bin/pip" install "${pip_q[@]}" -q --no-deps --no-build-isolation -e "$repo" >/dev/null 2>&1 \
    || "$venv/bin/pip" install "${pip_q[@]}" --no-deps --no-build-isolation -e "$repo" >&2
  echo "$venv"
  exit 0
fi

t0=$(date +%s)
say "no cached environment for key $key: building $venv (cold path, ~15-35 min on 2 cores; measured 16 min)"
rm -rf "$venv"
mkdir -p "$root"
"$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
C=(-c "$repo/env/constraints.txt")

say "step 1/4: pip, setuptools, wheel (<1 min)"
"${pip[@]}" install "${pip_q[@]}" -q -U pip "setuptools<75" wheel >&2

say "step 2/4: torch 2.4.1 (CUDA build from PyPI, runs on CPU; ~3 GB, ~5 min)"
"${pip[@]}" install "${pip_q[@]}" "${C[@]}" torch >&2

say "step 3/4: torch-scatter (~5-9 min) and torch-sparse (~9-22 min), compiled against this torch"
say "          (--no-build-isolation --no-cache-dir: a cached wheel built for another torch fails with 'undefined symbol')"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" FORCE_ONLY_CPU="${FORCE_ONLY_CPU:-1}"
for ext in torch-scatter torch-sparse; do
  s=$(date +%s)
  say "          building $ext ..."
  "${pip[@]}" install "${pip_q[@]}" "${C[@]}" --no-build-isolation --no-cache-dir "$ext" >&2
  say "          $ext done in $(( $(date +%s) - s )) s"
done

say "step 4/4: fairchem-core 1.10 and the rest, then this package in editable mode (~3 min)"
"${pip[@]}" install "${pip_q[@]}" "${C[@]}" -e "$repo[dev]" >&2
"$venv/bin/python" -c "import torch, torch_scatter, torch_sparse, fairchem.core, scipy; print('torch', torch.__version__, 'scipy', scipy.__version__)" >&2
"${pip[@]}" freeze --exclude-editable > "$venv/.freeze.txt"
touch "$venv/.complete"
say "environment ready in $(( $(date +%s) - t0 )) s: $venv"
echo "$venv"
