"""docs/teaching.md: every experiment's command runs (scaled down) and makes the pictures
its text tells the reader to look at."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "teaching.md"

#: link and write rates are scaled by the same factor, so r·4096/B (what decides
#: convergence) stays what the text says; guests are 8 MiB; phases are 0.3x as long.
RATE_SCALE = 0.16
SCALE = [
    (r"--size 256M\b", "--size 8M"),
    (r"--bandwidth 100M\b", "--bandwidth 16M"),
    (r"\brate=(\d+)", lambda m: f"rate={int(int(m[1]) * RATE_SCALE)}"),
    (r"\bphases=([\d:,]+)", lambda m: "phases=" + ",".join(
        f"{int(int(r) * RATE_SCALE)}:{float(s) * 0.3:g}" for r, s in (p.split(":") for p in m[1].split(",")))),
]


def experiments() -> list[tuple[str, str, str]]:
    """``(title, command, section text)`` for each ``## N.`` section of the document."""
    text = DOC.read_text()
    out = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        if not re.match(r"\d+\. ", title):
            continue
        blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
        assert len(blocks) == 1, f"{title}: one command per experiment"
        out.append((title, blocks[0], section))
    return out


def scaled(command: str) -> str:
    for pattern, repl in SCALE:
        command = re.sub(pattern, repl, command)
    return command.replace("vmem migrate", "vmem migrate --quiet --warmup 0.2 --observe 0.1")


def test_the_document_has_five_experiments_each_scalable():
    got = experiments()
    assert len(got) == 5, [t for t, _, _ in got]
    for title, cmd, _ in got:
        assert "--size 256M" in cmd and "--bandwidth 100M" in cmd, title
        assert "--size 8M" in scaled(cmd) and "--pagemap" in cmd, title


@pytest.mark.parametrize("index", range(5))
def test_experiment_runs_and_draws_its_pictures(index, tmp_path):
    title, cmd, section = experiments()[index]
    script = "set -euo pipefail\nvmem() { \"$VMEM_PYTHON\" -m vmem \"$@\"; }\n" + scaled(cmd)
    env = dict(os.environ, VMEM_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{title}\n{scaled(cmd)}\n{proc.stderr[-3000:]}"
    # Every picture the text points at exists (and is a PNG / an HTML page).
    named = set(re.findall(r"`(e\d[\w-]*/[\w.-]+\.(?:png|html))`", section))
    assert named, f"{title}: the text names no picture"
    for rel in sorted(named):
        path = tmp_path / rel
        assert path.exists(), f"{title}: {rel} was not produced"
        head = path.read_bytes()[:16]
        assert head.startswith(b"\x89PNG") if rel.endswith(".png") else b"<!DOCTYPE html>" in head, rel
    for d in tmp_path.iterdir():  # every run's directory has the page map and the run's graphs
        if d.is_dir():
            for name in ("pagemap.png", "pagemap.html", "run-convergence.png", "run-dirty-rate.png", "run-downtime.png"):
                assert (d / name).exists(), f"{title}: {d.name}/{name}"
