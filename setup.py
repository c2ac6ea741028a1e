"""Shim so that setuptools builds the one cffi extension (vmem._vmem_native) at install.

All metadata lives in pyproject.toml; this file only exists because cffi's
out-of-line API mode hooks into setuptools through ``cffi_modules``.
"""
from setuptools import setup

setup(cffi_modules=["vmem/_build/build_native.py:ffibuilder"])
