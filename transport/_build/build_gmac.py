"""cffi build script for ``transport._gmac_native``: the C GMAC of keyed links (gmac_fragment.py).

transport imports nothing from vmem, so it has its own small extension; vmem's extension
compiles the same fragment for its post-copy fault threads.  Optional at run time:
transport.gmac falls back to libcrypto through cffi's ABI mode when it is not built.

Built by ``pip install -e .`` (setup.py: ``cffi_modules``) or by hand:
``python3 transport/_build/build_gmac.py`` (writes the extension into ``transport/``).
"""
import importlib.util
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_fragment():
    # by file path: building must not import the transport package
    spec = importlib.util.spec_from_file_location("_transport_build_gmac", os.path.join(_HERE, "gmac_fragment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_ffi() -> FFI:
    fragment = _load_fragment()
    ffi = FFI()
    ffi.cdef(fragment.TYPES)
    ffi.cdef(fragment.FUNCTIONS)
    ffi.set_source(
        "transport._gmac_native",
        fragment.INCLUDES + fragment.CUSTOMIZATIONS,
        extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"],
        libraries=["crypto"],
        # the stable ABI, as pip's build (cffi's setuptools hook) does: a build by hand then
        # writes the same file name (*.abi3.so) and cannot leave a stale *.cpython-*.so that
        # Python would import in its place
        py_limited_api=True,
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"transport-build-{os.getpid()}-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=False)
        shutil.copy(built, os.path.join(os.path.dirname(_HERE), os.path.basename(built)))
