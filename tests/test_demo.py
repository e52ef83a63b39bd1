"""The README's main job, shrunk."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_prints_held_out_nll():
    out = subprocess.run(
        [sys.executable, "-m", "pyro_lunet", "demo", "--samples", "2000", "--epochs", "3",
         "--blocks", "2", "--quiet"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "held-out NLL" in out.stdout and "nats" in out.stdout
