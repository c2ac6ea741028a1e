"""The package works without the checkout: build the wheel from the tracked files, install it
into a fresh virtualenv outside the checkout, and run ``vmem doctor`` and a 64 MiB verified
migration from that install.

This is the test that catches a sub-package missing from the wheel (package discovery), a
module that imports something only the checkout has, and a guest or destination process that
is started in a way that needs the source tree on ``sys.path``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 900


def _tracked_tree(dest: Path) -> None:
    """Copy the files git tracks (as they are in the working tree) into ``dest``: no build
    products, no virtualenv, no in-place native extension."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for rel in out.stdout.decode().split("\0"):
        if not rel or not (ROOT / rel).is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would let the checkout leak into the install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _python_packages(root: Path) -> set[str]:
    return {".".join(p.parent.relative_to(root).parts) for top in ("vmem", "guests", "transport")
            for p in (root / top).rglob("__init__.py")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, wheel path): the wheel built from the tracked tree, installed in a new venv."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are tracked")
    work = Path(tempfile.mkdtemp(prefix=f"vmem-wheel-{os.getpid()}-"))
    try:
        src, dist, venv = work / "src", work / "dist", work / "venv"
        _tracked_tree(src)
        env = _clean_env()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                       cwd=work, env=env, check=True, timeout=PIP_TIMEOUT_S)
        wheels = list(dist.glob("vmem-*.whl"))
        assert len(wheels) == 1, f"expected one vmem wheel, got {wheels}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels[0])],
                       cwd=work, env=env, check=True, timeout=PIP_TIMEOUT_S)
        yield venv / "bin", wheels[0], src
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_wheel_contains_every_package(installed):
    _, wheel, src = installed
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    in_wheel = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = _python_packages(src) - in_wheel
    assert not missing, f"packages missing from the wheel: {sorted(missing)}"
    assert any(n.startswith("vmem/_vmem_native") and n.endswith(".so") for n in names), "no native extension"
    assert any(n.startswith("transport/_gmac_native") and n.endswith(".so") for n in names), "no native GMAC"


def test_installed_wheel_runs_doctor_and_a_verified_migration(installed, tmp_path):
    bin_dir, _, _ = installed
    env = _clean_env()
    # Run from a directory that is not the checkout, so nothing can import vmem from there.
    where = subprocess.run([str(bin_dir / "python"), "-c", "import vmem, guests, transport; print(vmem.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert str(ROOT) not in where.stdout, f"imported vmem from the checkout: {where.stdout}"

    doctor = subprocess.run([str(bin_dir / "vmem"), "doctor"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "userfaultfd" in doctor.stdout
    assert "keyed-link MAC (AES-256-GMAC): native" in doctor.stdout, doctor.stdout  # transport's extension loaded

    report_path = tmp_path / "report.json"
    run = subprocess.run([str(bin_dir / "vmem"), "migrate", "--quiet", "--workload", "hotcold", "--size", "64M",
                          "-W", "rate=2000", "--json", str(report_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    assert report["outcome"] == "completed", report.get("reason")
    assert report["verified"] is True
    check = report["verification"]["guest_check"]
    assert check["ok"] is True and check["bad_pages"] == 0 and check["pages_checked"] > 16000, check
    assert report["verification"]["digests"]["mismatched"] == 0
    assert report["guest"]["destination"]["alive"] is True
    # Installed, not a checkout: no commit to name; the rest of the provenance is there.
    prov = report["provenance"]
    assert prov["git_commit"] is None and prov["vmem_version"] and "migrate" in prov["command_line"], prov


@pytest.mark.timeout(900)
def test_installed_wheel_registers_the_pytest_plugin_and_the_example_passes(installed, tmp_path):
    """docs/examples/test_vmem_example.py, copied out of the checkout, passes under the
    installed wheel's pytest plugin (entry point pytest11: no -p, no conftest)."""
    bin_dir, _, src = installed
    env = _clean_env()
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "pytest"], cwd=tmp_path, env=env,
                   check=True, timeout=PIP_TIMEOUT_S)
    example = tmp_path / "test_vmem_example.py"
    example.write_text((src / "docs" / "examples" / "test_vmem_example.py").read_text())
    run = subprocess.run([str(bin_dir / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", str(example)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout, run.stdout
    # Naming it as a checkout does (-p) loads the same registration, not a second one.
    markers = subprocess.run([str(bin_dir / "python"), "-m", "pytest", "-p", "vmem.testing.plugin", "--markers"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert markers.returncode == 0, markers.stdout + markers.stderr
    assert markers.stdout.count("@pytest.mark.vmem_kernel") == 1, markers.stdout
