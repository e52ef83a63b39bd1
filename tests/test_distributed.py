"""Data-parallel training (pyro_lunet.distributed): 2 gloo processes on the CPU equal one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyro_lunet import distributed

from ._dist_worker import DIM, every_family_flow, run_fit, run_svi

WORKER = Path(__file__).with_name("_dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(scenario: str, out: Path, world: int = 2, timeout: float = 90.0) -> list:
    """Starts ``world`` worker processes by hand (torchrun would stop the others itself when one
    fails); returns their (exit code, stderr), killing any still running after ``timeout``
    seconds (a hang fails the test rather than blocking it)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out), str(r), str(world), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"{scenario}: the ranks did not finish within {timeout:g} s (a hang)")
        results.append((proc.returncode, err))
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two ranks started by torchrun, through distributed.launch (what ``--nproc 2`` runs)."""
    out = tmp_path_factory.mktemp("dist")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setenv("PYTHONPATH", str(ROOT))
        code = distributed.launch(["fit", str(out)], 2, module="tests._dist_worker")
    errors = [p.read_text() for p in sorted(out.glob("error*.json"))]
    assert code == 0 and not errors, errors
    return out, [(out / f"stderr{r}.txt").read_text() for r in range(2)]


def _assert_states_equal(got: dict, expected: dict, tol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(got[key], value, rtol=0, atol=tol), key
        else:
            assert torch.equal(got[key], value), key


def test_two_ranks_equal_one_process(two_ranks):
    out, _ = two_ranks
    flow, result = run_fit()
    expected = flow.state_dict()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for saved in ranks:
        _assert_states_equal(saved["state"], expected)
        for key in ("train_nll", "val_nll"):
            assert saved["history"][key] == pytest.approx(result.history[key], abs=1e-9)
        assert saved["best_epoch"] == result.best_epoch
    # The replicas are bit for bit the same (checked after each epoch too).
    _assert_states_equal(ranks[1]["state"], ranks[0]["state"], tol=0.0)
    # Rank-one merges happened during the run: v was redrawn (the counters are the
    # layer's extra state: seed, steps, rounds, draws).
    (rank_one,) = [k for k in expected if k.endswith("_extra_state")]
    assert expected[rank_one][3] >= 2
    assert len(result.history["val_nll"]) == 4


def test_only_rank_zero_prints_and_writes(two_ranks):
    out, stderr = two_ranks
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [saved["wrote"] for saved in ranks] == [[0], []]
    assert "epoch 4/4" in stderr[0] and "epoch" not in stderr[1]
    flow = every_family_flow(DIM, "density").double()
    flow.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    _assert_states_equal(flow.state_dict(), ranks[0]["state"], tol=0.0)


def test_divergence_different_data_and_a_failed_write_are_errors(two_ranks):
    out, _ = two_ranks
    for r in range(2):
        replicas, data, write = torch.load(out / f"rank{r}.pt", weights_only=False)["errors"]
        assert f"rank {r} of 2: the replicas diverged after the test's change" in replicas
        assert "1 entries differ between ranks" in replicas
        assert f"rank {r} of 2: data differs between ranks" in data
        # A write failing on rank 0 fails every rank (no one waits for it).
        expected = "OSError: disk full" if r == 0 else "RuntimeError: rank 1 of 2: rank 0 failed"
        assert write.startswith(expected), write


def test_svi_recipe_two_ranks_equal_full_batch(two_ranks):
    out, _ = two_ranks
    expected = run_svi()
    for r in range(2):
        got = torch.load(out / f"rank{r}.pt", weights_only=False)["svi"]
        _assert_states_equal(got, expected)
    merges = [v for k, v in expected.items() if k.endswith("_extra_state")]
    assert merges and merges[0][3] >= 2  # the guide's rank-one layer merged itself


def test_a_failing_rank_stops_every_rank(tmp_path):
    start = time.monotonic()
    results = _run_ranks("fail", tmp_path, timeout=60)
    assert [code for code, _ in results] == [1, 1]
    errors = [json.loads((tmp_path / f"error{r}.json").read_text()) for r in range(2)]
    assert "injected failure" in errors[1]["message"]
    assert errors[0]["type"] == "CollectiveError", errors[0]
    assert "rank 0 of 2" in errors[0]["message"] and "another rank" in errors[0]["message"]
    assert time.monotonic() - start < 45  # well within the group's 30 s timeout + start-up


def test_single_process_helpers_are_no_ops():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (
        0, 1, True,
    )  # fmt: skip
    x = torch.arange(5.0)
    assert distributed.shard(x) is not None and torch.equal(distributed.shard(x), x)
    assert distributed.shard_bounds(10, 1, 3) == (3, 6)
    assert distributed.all_reduce_sum(x) is x
    with distributed.process_group_from_env():  # no launcher: nothing to start
        assert not distributed.is_initialized()
    done = []
    distributed.write_on_main(lambda: done.append(1))
    assert done == [1]
    with pytest.raises(ValueError, match="rank must lie in"):
        distributed.shard_bounds(4, 2, 2)


def test_launch_command_uses_torchrun():
    cmd = distributed.launch_command(["fit", "moons"], 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[-4:] == ["-m", "pyro_lunet", "fit", "moons"]
    assert "--nproc-per-node" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    with pytest.raises(ValueError, match="nproc must be a positive int, got 0"):
        distributed.launch_command(["fit"], 0)


def test_cli_fit_nproc_relaunches_through_torchrun_and_writes_once(tmp_path):
    """``pyro-lunet fit ... --nproc 2``: two processes, one report, one run folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "pyro_lunet", "fit", "moons", "--rows", "600", "--epochs", "1",
         "--nproc", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("fitting lu-net") == 1 and done.stdout.count("wrote ") == 1
    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file()
