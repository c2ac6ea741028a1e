#!/usr/bin/env bash
# Quick start, command 1: set everything up, show the kernel features, and live-migrate a
# 1 GiB guest running a hot/cold workload to a new process, with a live display.
# Extra arguments go to `vmem migrate` (e.g. --tracker mprotect --json report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/vmem doctor
exec .venv/bin/vmem migrate --workload hotcold --size 1G -W rate=5000 "$@"
