#!/usr/bin/env bash
# Runs the test suite on a fresh machine: sets up .venv (CPU torch 2.13.0 + requirements-dev.txt), then pytest.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0 -r requirements-dev.txt
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test; that is not a failure of the code under test.
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$rc"
