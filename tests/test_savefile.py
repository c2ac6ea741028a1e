"""Tests for vmem.migration.savefile: save real running guests, check the file with an independent
reader written from Xen's specs (tests/xen_spec_reader.py, which imports nothing from
vmem), restore, and prove the restored guest continues and passes its own ledger check.
Malformed files are refused with StreamError and leave no process behind (no_leaks)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xen_spec_reader as spec
from vmem import _native as nat
from vmem.migration import savefile
from vmem.format import stream
from vmem.errors import StreamError
from vmem.migration.savefile import restore_guest, save_guest

SIZE = 64 << 20
NPAGES = SIZE // 4096
PARAMS = {"rate": 20000}


def wait_steps(guest, beyond: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while guest.counters()["steps"] <= beyond:
        assert guest.alive(), "guest died"
        assert time.monotonic() < deadline, f"guest made no progress beyond step {beyond}"
        time.sleep(0.01)
    return guest.counters()["steps"]


def digest_of(pages: np.ndarray) -> str:
    """The whole-RAM digest computed here from pages the independent reader collected."""
    out = np.empty(len(pages), dtype=np.uint64)
    nat.digest_range(pages.ctypes.data, 0, len(pages), out)
    return "blake2b-128:" + hashlib.blake2b(out.astype("<u8").tobytes(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------------
# Save, check independently, restore
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload, version", [("hotcold", 2), ("uniform", 3)])
def test_save_check_with_spec_reader_and_restore(boot_guest, tmp_path, workload, version):
    guest = boot_guest(workload, size=SIZE, seed=3, **PARAMS)
    wait_steps(guest, 500)
    path = tmp_path / f"vmem-{os.getpid()}-{workload}.sav"
    stats = save_guest(guest, path, version=version, name="saved-guest")
    assert not guest.alive(), "xl save semantics: the guest exits after a successful save"
    assert path.exists() and not Path(str(path) + ".part").exists()
    saved_steps = stats["counters"]["steps"]
    assert saved_steps >= 500 and stats["pages"] > 0 and stats["bytes"] == path.stat().st_size

    # --- the independent reader, from the specs ---
    ram = np.zeros((NPAGES, 4096), dtype=np.uint8)
    summary = spec.read_save_file(path.read_bytes(), collect_pages=ram)
    assert summary["xl"]["mandatory_flags"] == spec.XL_FLAG_JSON | spec.XL_FLAG_STREAMV2
    config = summary["xl"]["config"]
    assert config["c_info"] == {"type": "hvm", "name": "saved-guest"}
    assert config["b_info"]["max_memkb"] == SIZE // 1024
    assert config["vmem"]["guest"]["workload"] == workload
    libxc = summary["libxc"]
    assert (libxc["version"], libxc["domain_type"], libxc["xen"]) == (version, "x86 HVM", "4.17")
    expected = ["PAGE_DATA", "X86_TSC_INFO", "HVM_PARAMS", "HVM_CONTEXT", "END"]
    if version == 3:
        expected.insert(0, "STATIC_DATA_END")
    assert libxc["order"] == expected
    assert libxc["records"]["HVM_CONTEXT"] == 1 and libxc["records"]["HVM_PARAMS"] == 1
    assert libxc["pages_with_data"] == stats["pages"]
    pfns = libxc["pfns"]
    assert len(np.unique(pfns)) == len(pfns) and pfns.max() < NPAGES
    assert [e[0] for e in libxc["hvm_context"]["entries"]] == [spec.HVM_CODE_HEADER, spec.HVM_CODE_END]
    params = libxc["hvm_params"]
    assert set(spec.HVM_PARAM_NAMES) <= set(params)
    assert all(params[i] >= NPAGES for i in spec.HVM_PARAM_NAMES if i != 12)  # pfns outside RAM
    assert params[1] == 0xFF000 - 8 + 4  # xenstore: Xen's special page, a 64 MiB guest
    assert libxc["tsc_info"]["mode"] == 0 and libxc["tsc_info"]["nsec"] > 0
    assert summary["libxl_records"] == ["LIBXC_CONTEXT", "EMULATOR_CONTEXT", "END"]
    (emu,) = summary["emulator_records"]
    assert emu["emulator"] == "Unknown" and json.loads(emu["data"])["runtime"]["steps"] == saved_steps
    # What the spec reader saw is what vmem digested on the way out.
    assert digest_of(ram) == stats["ram_digest"] == config["vmem"]["ram_digest"]

    # --- restore: continues from the saved counters and passes its own check ---
    restored, rstats = restore_guest(path, name="restored")
    with restored:
        assert rstats["name"] == "restored" and rstats["pages"] == stats["pages"]
        assert rstats["ram_digest"] == stats["ram_digest"]
        assert rstats["saved_counters"]["steps"] == saved_steps
        assert restored.counters()["steps"] >= saved_steps
        wait_steps(restored, saved_steps + 200)
        check = restored.verify()
        assert check["ok"], check
        restored.exit()


def test_keep_running_resumes_the_guest(boot_guest, tmp_path):
    guest = boot_guest("hotcold", size=SIZE, seed=5, **PARAMS)
    wait_steps(guest, 100)
    path = tmp_path / "keep.sav"
    stats = save_guest(guest, path, keep_running=True)
    assert guest.alive()
    wait_steps(guest, stats["counters"]["steps"] + 100)
    assert guest.verify()["ok"]
    assert savefile.check_savefile(path)["pages"] == stats["pages"]


XEN_VERIFIER, XEN_VERIFIER_MISSING = spec.find_verify_stream_v2()


@pytest.mark.skipif(XEN_VERIFIER is None, reason=XEN_VERIFIER_MISSING)
@pytest.mark.parametrize("version", [2, 3])
def test_xen_verify_stream_accepts_save_files(boot_guest, tmp_path, version):
    guest = boot_guest("uniform", size=16 << 20, seed=2, **PARAMS)
    path = tmp_path / f"vmem-{os.getpid()}-v{version}.sav"
    save_guest(guest, path, version=version)
    result = spec.run_verify_stream_v2(XEN_VERIFIER, path, "xl")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "Processed xl header" in out and "HVM context" in out and "Libxl Record: End" in out


# ----------------------------------------------------------------------------------------
# Save failures: no file, guest running
# ----------------------------------------------------------------------------------------


def test_failed_save_leaves_no_file_and_resumes_the_guest(boot_guest, tmp_path):
    guest = boot_guest("uniform", size=16 << 20, seed=4, **PARAMS)
    path = tmp_path / "fail.sav"

    def explode(done, total):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_guest(guest, path, progress=explode)
    assert os.listdir(tmp_path) == []
    assert guest.alive()
    wait_steps(guest, guest.counters()["steps"] + 50)
    with pytest.raises(OSError):
        save_guest(guest, tmp_path / "no-such-dir" / "x.sav")
    assert guest.alive() and guest.verify()["ok"]
    with pytest.raises(ValueError):
        save_guest(guest, path, version=4)


# ----------------------------------------------------------------------------------------
# Malformed files: StreamError naming the offset, nothing left behind
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> bytes:
    """One real save file (16 MiB guest), as bytes."""
    from guests.launch import GuestSpec, ProcessGuest

    path = tmp_path_factory.mktemp("saved") / "base.sav"
    with ProcessGuest.boot(GuestSpec("hotcold", PARAMS, 9), 16 << 20) as guest:
        wait_steps(guest, 100)
        save_guest(guest, path)
    return path.read_bytes()


def _layout(data: bytes) -> dict:
    hdr = savefile.read_xl_header(_Reader(data).recv_exact)
    s = hdr.stream_offset
    return {"stream": s, "first_record": s + 64, "end": len(data)}


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def recv_exact(self, n):
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _restore_bytes(tmp_path, data: bytes, match: str) -> StreamError:
    path = tmp_path / "bad.sav"
    path.write_bytes(data)
    with pytest.raises(StreamError, match=match) as info:
        guest, _ = restore_guest(path)
        guest.close()  # pragma: no cover - only if the test fails
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize("cut", ["header", "config", "libxl_header", "page_data", "last_octet"])
def test_truncated_files_are_refused(saved, tmp_path, cut):
    lay = _layout(saved)
    at = {"header": 20, "config": 60, "libxl_header": lay["stream"] + 5,
          "page_data": lay["first_record"] + 5000, "last_octet": len(saved) - 1}[cut]
    err = _restore_bytes(tmp_path, saved[:at], "truncated")
    assert 0 <= err.offset <= at


def test_corrupt_files_are_refused(saved, tmp_path):
    lay = _layout(saved)
    cases = []
    b = bytearray(saved); b[0] ^= 1
    cases.append((b, "not an xl save file"))
    b = bytearray(saved); b[32:36] = struct.pack(">I", 0x01020304)
    cases.append((b, "byte order"))
    b = bytearray(saved); b[36] |= 0x80
    cases.append((b, "unknown mandatory flags"))
    b = bytearray(saved); b[40] = 1
    cases.append((b, "unknown optional flags"))
    b = bytearray(saved); b[44:48] = struct.pack("<I", 0xFFFF_FFF0)
    cases.append((b, "optional data length .* exceeds"))
    b = bytearray(saved); b[lay["stream"] - 2] = ord("x")  # the config's closing brace
    cases.append((b, "malformed JSON"))
    b = bytearray(saved); b[lay["stream"] + 11] = 3  # libxl version 3
    cases.append((b, "libxl stream version 3"))
    b = bytearray(saved) + b"\0" * 8
    cases.append((b, "data after the libxl END"))
    b = bytearray(saved); b[-40] ^= 0xFF  # inside the guest context (JSON)
    cases.append((b, "guest context does not match"))
    b = bytearray(saved); b[lay["first_record"] + 16 + 8 + 8 * 1024 + 100] ^= 1  # page data
    cases.append((b, "does not match the save.*page data corrupt"))
    # pfn beyond the saved guest's RAM
    b = bytearray(saved); b[lay["first_record"] + 16 + 4] = 0x10
    cases.append((b, "beyond max_pfn"))
    for data, match in cases:
        _restore_bytes(tmp_path, bytes(data), match)


def test_a_file_without_hvm_state_or_vmem_config_is_refused(tmp_path):
    # A hand-built image: valid framing, but no HVM_PARAMS/HVM_CONTEXT.
    config = {"vmem": {"format": 1, "npages": 4, "page_size": 4096, "ram_digest": "x",
                       "guest": {"workload": "idle", "params": {}, "seed": 0}}}
    parts: list = []
    w = stream.StreamWriter(parts.extend)
    w.begin()
    w.page_data(np.arange(2), [np.zeros((2, 4096), np.uint8)])
    w.end_libxc()
    w.emulator_context(b"{}")
    w.end_libxl()
    body = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    err = _restore_bytes(tmp_path, savefile.encode_xl_header(config) + body, "without HVM_PARAMS and HVM_CONTEXT")
    assert err.offset > 48
    _restore_bytes(tmp_path, savefile.encode_xl_header({"c_info": {}}) + body, "no \"vmem\" section")
    with pytest.raises(spec.SpecError, match="without HVM_CONTEXT"):
        spec.read_save_file(savefile.encode_xl_header(config) + body)


def test_check_savefile_and_cli(saved, tmp_path):
    path = tmp_path / "c.sav"
    path.write_bytes(saved)
    summary = savefile.check_savefile(path)
    assert summary["pages"] > 0 and summary["stream_version"] == 2
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-m", "vmem.migration.savefile", "check", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["pages"] == summary["pages"]
    path.write_bytes(saved[:100])
    out = subprocess.run([sys.executable, "-m", "vmem.migration.savefile", "check", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "truncated" in out.stderr
