"""Shim so that setuptools builds the cffi extensions at install: vmem._vmem_native, and
transport._gmac_native (transport imports nothing from vmem, so its C GMAC is its own).

All metadata lives in pyproject.toml; this file only exists because cffi's
out-of-line API mode hooks into setuptools through ``cffi_modules``.
"""
from setuptools import setup

setup(cffi_modules=["vmem/_build/build_native.py:ffibuilder", "transport/_build/build_gmac.py:ffibuilder"])
