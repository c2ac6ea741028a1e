#!/usr/bin/env bash
# Set up vmem on a fresh Debian/Ubuntu machine: system packages (if missing and we are
# root), a virtualenv in .venv, the package with its cffi extension built in place, and a
# kernel feature report.  Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

missing=()
"$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
command -v gcc >/dev/null || missing+=(gcc)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.vmem-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ -n "$(find vmem/_build -newer "$stamp" -name '*.py' -o -newer "$stamp" -name '*.c' 2>/dev/null | head -1)" ] \
   || ! .venv/bin/python -c 'import vmem._vmem_native' 2>/dev/null; then
  echo "setup: installing vmem and its dependencies into .venv (builds the native extension)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
.venv/bin/python -c 'import vmem._native' || { echo "setup: the native extension did not build" >&2; exit 1; }
echo "setup: ready (.venv/bin/vmem)"
