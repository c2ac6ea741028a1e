"""cffi build script for the one native extension, ``vmem._vmem_native`` (out-of-line API mode).

Each concern has its own fragment module beside this file (pyca/cryptography style), each
with four strings:

    INCLUDES        C headers it needs, and the declarations older headers lack (goes to
                    the top of the C source, before any fragment's code)
    TYPES           constants and types Python may see (goes to the cdef)
    FUNCTIONS       C function prototypes Python may call (goes to the cdef)
    CUSTOMIZATIONS  C code: the implementation (goes to the C source)

All fragments compile into ONE extension.  ``common`` is the shared fragment: it comes
first, and holds the page size and every helper or declaration one fragment needs from
another, so the order of the other fragments does not matter.  The fragments are loaded by file path, not
imported as ``vmem._build.*``, so that building never imports the ``vmem`` package (whose
``__init__`` may need the extension being built).

Built by ``pip install -e .`` (setup.py: ``cffi_modules``) or by hand:
``python3 vmem/_build/build_native.py`` (writes the extension into ``vmem/``).
"""
import importlib.util
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

# The shared fragment first (feature macros, headers, helpers used across fragments); the
# others in any order.
SHARED_FRAGMENT = "common"
FRAGMENTS = [SHARED_FRAGMENT, "memfd", "process", "uffd", "pagemap", "mprot", "digest", "postcopy", "kvm", "gmac"]


# Fragments of other packages vmem depends on, by path from the checkout's root: transport's
# C GMAC, which the post-copy fault threads tag keyed frames with.
FOREIGN_FRAGMENTS = {"gmac": os.path.join("transport", "_build", "gmac_fragment.py")}


def _load_fragment(name):
    path = (os.path.join(os.path.dirname(os.path.dirname(_HERE)), FOREIGN_FRAGMENTS[name])
            if name in FOREIGN_FRAGMENTS else os.path.join(_HERE, f"{name}.py"))
    spec = importlib.util.spec_from_file_location(f"_vmem_build_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_ffi() -> FFI:
    modules = [_load_fragment(name) for name in FRAGMENTS]
    ffi = FFI()
    ffi.cdef("\n".join(m.TYPES for m in modules))
    ffi.cdef("\n".join(m.FUNCTIONS for m in modules))
    source = "\n".join([m.INCLUDES for m in modules] + [m.CUSTOMIZATIONS for m in modules])
    ffi.set_source(
        "vmem._vmem_native",
        source,
        extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"],
        libraries=["crypto"],  # AES-256-GMAC of keyed urgent links (OpenSSL's libcrypto, as Python's own ssl)
        # the stable ABI, as pip's build (cffi's setuptools hook) does: a build by hand then
        # writes the same file name (*.abi3.so) and cannot leave a stale *.cpython-*.so that
        # Python would import in its place
        py_limited_api=True,
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    # Build in place: vmem/_vmem_native.*.so next to vmem/_native.py; intermediates in a
    # temporary directory.
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"vmem-build-{os.getpid()}-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=True)
        shutil.copy(built, os.path.join(os.path.dirname(_HERE), os.path.basename(built)))
