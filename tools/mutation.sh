#!/usr/bin/env bash
# The mutation pass over the settings layer (optim_args.py, arguments.py, param_groups.py, build.py) with the fast
# tests ([tool.mutmut] in pyproject.toml). Not run by CI (it takes tens of minutes). Prints the score and the
# surviving mutants; docs/testing.md lists the survivors judged equivalent, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q "mutmut==3.8.1"
rm -rf mutants
OMP_NUM_THREADS=1 mutmut run --max-children "${MUTMUT_CHILDREN:-2}" || true
mutmut results --all true > mutation-results.txt || true
echo "killed: $(grep -c ': killed' mutation-results.txt || true)"
echo "survived: $(grep -c ': survived' mutation-results.txt || true)"
grep -v ': killed' mutation-results.txt || true
