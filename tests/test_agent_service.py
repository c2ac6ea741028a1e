"""``vmem agent --check`` and the systemd unit (packaging/vmem-agent.service)."""
from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys

import pytest

from test_agent import ROOT, _env  # noqa: F401  (the harness of the agent tests)
from test_agent import key, workdir  # noqa: F401  (fixtures)

UNIT = os.path.join(ROOT, "packaging", "vmem-agent.service")


def _check(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmem", "agent", "--check", *argv], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_check_accepts_a_good_configuration_and_starts_nothing(workdir, key):  # noqa: F811
    state = os.path.join(workdir, "state")
    run = _check("--listen", "127.0.0.1:0", "--key", key, "--state-dir", state)
    assert run.returncode == 0, run.stderr
    assert "configuration ok" in run.stdout and "security key" in run.stdout
    assert not os.path.exists(state)  # nothing created, nothing bound


def test_check_reports_every_problem_on_one_line_each(workdir):  # noqa: F811
    loose = os.path.join(workdir, "loose.key")
    with open(loose, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(loose, 0o644)
    not_a_dir = os.path.join(workdir, "file")
    open(not_a_dir, "w").close()
    run = _check("--listen", "127.0.0.1:0", "--key", loose, "--max-connections", "0", "--state-dir", not_a_dir)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 3, run.stderr
    assert any("--key" in line for line in lines)
    assert any("--max-connections: must be positive" in line for line in lines)
    assert any("--state-dir" in line and "not a directory" in line for line in lines)
    assert run.stdout == ""


def test_check_refuses_an_open_listen_address_without_authentication(workdir):  # noqa: F811
    run = _check("--listen", "10.0.0.1:8002", "--state-dir", os.path.join(workdir, "s"))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "--listen" in run.stderr and "without authentication" in run.stderr


def test_check_refuses_a_state_dir_of_another_user(workdir):  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of another uid")
    other = os.path.join(workdir, "other")
    os.mkdir(other)
    os.chown(other, 65534, 65534)
    run = _check("--listen", "127.0.0.1:0", "--state-dir", other)
    assert run.returncode == 2 and "belongs to uid 65534" in run.stderr


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    return unit


def test_the_unit_keeps_guests_across_restarts():
    service = _unit()["Service"]
    assert service["KillMode"] == "process"            # systemd must not kill the guests with the agent
    assert service["RuntimeDirectoryPreserve"] == "yes"  # the guest records survive a stop
    assert service["KillSignal"] == "SIGTERM"


def test_the_units_command_line_passes_check(workdir, key):  # noqa: F811
    """ExecStartPre and ExecStart are the same agent command line (with and without
    --check), and it is one vmem accepts, with this test's key and state directory."""
    service = _unit()["Service"]
    pre, start = shlex.split(service["ExecStartPre"]), shlex.split(service["ExecStart"])
    assert pre[:4] == start[:4] and pre[3:5] == ["agent", "--check"]
    assert [a for a in pre if a != "--check"] == start
    argv = start[4:]
    subst = {"${VMEM_LISTEN}": "127.0.0.1:0", "/etc/vmem/agent.key": key,
             "/run/vmem/8002": os.path.join(workdir, "state")}
    argv = [subst.get(a, a) for a in argv if a != "$VMEM_ARGS"]
    run = _check(*argv)
    assert run.returncode == 0, run.stderr
