#!/usr/bin/env bash
# Quick start, command 2: set everything up and run the test suite on two workers.
# Extra arguments go to pytest (e.g. -k tracker, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -p no:cacheprovider tests "$@"
