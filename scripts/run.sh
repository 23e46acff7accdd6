#!/usr/bin/env bash
# Entry point of the Makefile targets: set up (or reuse) the cached environment, then run.
#   scripts/run.sh demo [extra args for python -m fairchem_dens.demo]
#   scripts/run.sh test [extra pytest args]
#   scripts/run.sh lint
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="$(bash scripts/setup_env.sh | tail -n 1)"
export PATH="$venv/bin:$PATH"
what="${1:-}"; shift || true
case "$what" in
  demo) exec python -m fairchem_dens.demo "$@" ;;
  test)
    set +e
    python -m pytest "$@"
    rc=$?
    [ "$rc" -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
    exit "$rc" ;;
  lint) exec ruff check fairchem_dens tests scripts benchmarks ;;
  *) echo "usage: scripts/run.sh {demo|test|lint} [args]" >&2; exit 2 ;;
esac
