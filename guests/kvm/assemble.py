"""Assemble program.S into program.bin with the system assembler (GNU as + objcopy).

program.bin is shipped beside its source so that running a KVM guest needs no toolchain;
``python -m guests.kvm.assemble`` rebuilds it after an edit, and tests/test_kvm.py holds
the two equal wherever ``as`` is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from guests.kvm.layout import PROGRAM_BIN, PROGRAM_SRC


def assemble(src: str = PROGRAM_SRC) -> bytes:
    """The flat binary of ``src``.

    Raises:
        FileNotFoundError: ``as`` or ``objcopy`` is not installed (binutils).
        subprocess.CalledProcessError: the source does not assemble (stderr attached).
    """
    for tool in ("as", "objcopy"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} (binutils) is not installed")
    with tempfile.TemporaryDirectory(prefix=f"vmem-kvm-as-{os.getpid()}-") as tmp:
        obj, binary = os.path.join(tmp, "program.o"), os.path.join(tmp, "program.bin")
        subprocess.run(["as", "--64", "-o", obj, src], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, binary], check=True, capture_output=True)
        with open(binary, "rb") as f:
            return f.read()


def main() -> int:
    code = assemble()
    with open(PROGRAM_BIN, "wb") as f:
        f.write(code)
    print(f"wrote {PROGRAM_BIN} ({len(code)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
