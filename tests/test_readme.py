"""The README's examples run as written: its Python blocks in order in one namespace, its
command-line block in a scratch folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run():
    blocks = _blocks("python")
    assert len(blocks) >= 2, "the README should show a density model and a guide"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    data = namespace["data"]
    gaussian = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T))
    assert namespace["loss"].item() < -gaussian.log_prob(data).mean().item()  # not Gaussian
    assert sum(namespace["losses"][-50:]) < sum(namespace["losses"][:50])


def test_readme_command_line_runs(tmp_path):
    (block,) = _blocks("sh")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    assert (tmp_path / "runs" / "moons" / "model.pt").exists()
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 1001
