#!/usr/bin/env bash
# Set up vmem on a fresh Debian/Ubuntu machine: system packages (if missing and we are
# root), a virtualenv in .venv, the package with its cffi extension built in place, and
# Xen's stream verifier for the tests.  Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

missing=()
"$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
command -v gcc >/dev/null || missing+=(gcc)
# OpenSSL's headers: the native GMAC of keyed links (transport and the post-copy threads) uses libcrypto.
[ -e /usr/include/openssl/hmac.h ] || missing+=(libssl-dev)
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

# Optional: a headless browser, in which tests/test_pagemap.py loads the page map's
# step-through HTML (without it that test skips, quoting why).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing chromium (headless browser for the page map test) with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
    || echo "setup: could not install chromium (no network?); the browser test will skip" >&2
fi

# Optional: the nested Xen test host (scripts/xenhost.sh, tests/test_xen.py): QEMU to boot
# Xen under TCG, debootstrap for dom0's root filesystem, cpio/zstd/kmod to pack its initramfs.
# Without them the Xen tests skip, quoting what is missing.
xen_host_pkgs=()
command -v qemu-system-x86_64 >/dev/null || xen_host_pkgs+=(qemu-system-x86)
command -v debootstrap >/dev/null || xen_host_pkgs+=(debootstrap)
command -v cpio >/dev/null || xen_host_pkgs+=(cpio)
command -v zstd >/dev/null || xen_host_pkgs+=(zstd)
command -v depmod >/dev/null || xen_host_pkgs+=(kmod)
if ((${#xen_host_pkgs[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing ${xen_host_pkgs[*]} (the nested Xen test host) with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${xen_host_pkgs[@]}" >/dev/null; } \
    || echo "setup: could not install ${xen_host_pkgs[*]} (no network?); the Xen tests will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.vmem-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ -n "$(find vmem/_build transport/_build -newer "$stamp" -name '*.py' -o -newer "$stamp" -name '*.c' 2>/dev/null | head -1)" ] \
   || ! .venv/bin/python -c 'import vmem._vmem_native, transport._gmac_native' 2>/dev/null; then
  echo "setup: installing vmem and its dependencies into .venv (builds the native extensions)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
.venv/bin/python -c 'import vmem._native, transport._gmac_native' || { echo "setup: the native extensions did not build" >&2; exit 1; }

# Xen's own verify-stream-v2 checks vmem's streams in the tests: Debian's xen-utils-4.17
# (bookworm main) unpacked into the ignored .cache/xen-utils -- no system install, no
# maintainer scripts (dpkg-deb -x).  The script is Python 3 and needs only the package's
# pure-Python xen.migration modules, not the Xen libraries it depends on.  Optional: if
# the fetch fails, say why (the tests skip with that reason) and carry on.
xen_pkg=xen-utils-4.17
xen_cache=.cache/xen-utils
fetch_xen_utils() {
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "apt-get and dpkg-deb are needed (Debian/Ubuntu)"; return 1; }
  if ! apt-cache show "$xen_pkg" >/dev/null 2>&1; then
    # the package lists may be missing or stale: refresh them once (root only)
    [ "$(id -u)" = 0 ] || { echo "apt does not know $xen_pkg (apt-get update needs root)"; return 1; }
    apt-get update -qq >/dev/null 2>&1 || { echo "apt-get update failed (no network?)"; return 1; }
    apt-cache show "$xen_pkg" >/dev/null 2>&1 || { echo "no package $xen_pkg in this machine's apt sources (it is in Debian 12's main)"; return 1; }
  fi
  local tmp err
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/vmem-xen-utils.XXXXXX")
  # apt-get download writes into the current directory; -o quiets the "unsandboxed" note root gets in /tmp
  if ! err=$(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$xen_pkg" 2>&1 >/dev/null); then
    rm -rf "$tmp"; echo "apt-get download $xen_pkg failed (no network?): $(echo "$err" | tail -1)"; return 1
  fi
  if ! err=$(dpkg-deb -x "$tmp"/*.deb "$tmp/root" 2>&1); then
    rm -rf "$tmp"; echo "dpkg-deb -x failed: $err"; return 1
  fi
  rm -rf "$xen_cache" && mkdir -p "$(dirname "$xen_cache")" && mv "$tmp/root" "$xen_cache"
  rm -rf "$tmp"
}
if ! compgen -G "$xen_cache/usr/lib/xen-*/bin/verify-stream-v2" >/dev/null; then
  echo "setup: fetching Debian's $xen_pkg for Xen's verify-stream-v2 (unpacked into $xen_cache)"
  if why=$(fetch_xen_utils); then
    echo "setup: $(ls "$xen_cache"/usr/lib/xen-*/bin/verify-stream-v2)"
  else
    echo "setup: Xen's verify-stream-v2 is unavailable: $why; its tests will skip" >&2
    mkdir -p "$xen_cache" && echo "$why" > "$xen_cache/UNAVAILABLE"
  fi
fi
echo "setup: ready (.venv/bin/vmem)"
