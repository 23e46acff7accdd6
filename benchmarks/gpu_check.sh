#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine whose image has PyTorch + CUDA but not
# this package's other dependencies, and no network (e.g. a short GPU lease).
#
#   bash benchmarks/gpu_check.sh prepare      # here, with network and the cached env:
#                                             #   .gpu/wheels (fairchem-core 1.10 and the pure /
#                                             #   cp312 packages the image lacks) and
#                                             #   .gpu/data/mlearn_Si_stress (converted)
#   bash benchmarks/gpu_check.sh run [ARGS]   # there (carry .gpu): install the wheels into
#                                             #   /tmp, put stand-ins for missing torch_scatter /
#                                             #   wandb on PYTHONPATH, run gpu_check.py ARGS
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="$repo/.gpu"
# versions of the cached env (scripts/setup_env.sh); lmdb < 2 (see pyproject.toml)
WHEELS="fairchem-core==1.10.0 ase==3.25.0 lmdb==1.6.2 orjson==3.13.0 submitit==1.5.4
        pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.7.0 typing_inspection==0.4.2"
PY_VERSION="${GPU_PYTHON_VERSION:-3.12}"

case "${1:-}" in
  prepare)
    mkdir -p "$carry/wheels" "$carry/data"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$carry/wheels" $WHEELS
    venv="$(bash "$repo/scripts/setup_env.sh" | tail -n 1)"
    "$venv/bin/python" - "$carry/data" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.datasets import mlearn
out = Path(sys.argv[1])
src = mlearn("Si", cache=out / "cache", stress=True).lmdb_dir
shutil.rmtree(out / "mlearn_Si_stress", ignore_errors=True)
shutil.copytree(src, out / "mlearn_Si_stress")
shutil.rmtree(out / "cache")
PY
    du -sh "$carry"/* ;;
  run)
    shift
    site=/tmp/gpu_check_site shims=/tmp/gpu_check_shims
    if compgen -G "$carry/wheels/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$carry"/wheels/*.whl
    fi
    export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p "$shims"
    for module in torch_scatter wandb; do  # a stand-in only where the real one is missing
      python3 -c "import $module" 2>/dev/null \
        || ln -sfn "$repo/benchmarks/gpu_shims/$module" "$shims/$module"
    done
    export PYTHONPATH="$PYTHONPATH:$shims"
    extra=()
    [ -d "$carry/data/mlearn_Si_stress" ] && extra=(--mlearn-lmdb "$carry/data/mlearn_Si_stress")
    exec python3 "$repo/benchmarks/gpu_check.py" "${extra[@]}" "$@" ;;
  *) echo "usage: benchmarks/gpu_check.sh {prepare|run [gpu_check.py args]}" >&2; exit 2 ;;
esac
