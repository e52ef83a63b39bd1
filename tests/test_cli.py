"""The ``pyro-lunet`` command, run through its installed console script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = shutil.which("pyro-lunet", path=str(Path(sys.executable).parent)) or "pyro-lunet"
# Each command's process gets one thread, as the test workers do (conftest).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FITTED_FILES = {"config.json", "model.pt", "metrics.json", "loss.png", ".pyro-lunet-run"}


def cli(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=600)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr
    return done


def fails(*args, cwd=None) -> str:
    """Runs a command that must fail with one line on stderr and no traceback; returns it."""
    done = cli(*args, cwd=cwd, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("pyro-lunet"), lines[0]
    return lines[0]


def read_csv(text: str) -> tuple[list[str], np.ndarray]:
    header, *rows = text.strip().splitlines()
    return header.split(","), np.array([[float(c) for c in row.split(",")] for row in rows])


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory) -> Path:
    """One small fit every test below reads (a coupling flow: its fit is not Gaussian)."""
    out = tmp_path_factory.mktemp("cli") / "moons-run"
    cli("fit", "moons", "--rows", 1200, "--epochs", 3, "--flow", "coupling:butterfly",
        "--blocks", 2, "--quiet", "--out", out)  # fmt: skip
    return out


# ------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["fit"], ["score"], ["sample"], ["bench"], ["demo"]])
def test_help_everywhere(command):
    out = cli(*command, "--help").stdout
    assert out.startswith("usage: pyro-lunet") and "--help" in out


def test_module_entry_point_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "pyro_lunet", "--version"], capture_output=True,
                          text=True, env=ENV, check=True)  # fmt: skip
    assert done.stdout.strip() == cli("--version").stdout.strip()


# -------------------------------------------------------------------- fit
def test_fit_writes_checkpoint_metrics_and_figures(moons_run):
    assert {p.name for p in moons_run.iterdir()} == FITTED_FILES | {"density.png"}
    metrics = json.loads((moons_run / "metrics.json").read_text())
    config = json.loads((moons_run / "config.json").read_text())
    assert config["flow"] == "coupling:butterfly" and config["input_dim"] == 2
    assert metrics["data"] == {"source": "moons", "rows": 1200, "dropped": 0, "dim": 2,
                               "train_rows": 1080, "val_rows": 120}  # fmt: skip
    for key in ("train_nll", "val_nll", "gaussian_val_nll"):
        entry = metrics[key]
        assert math.isfinite(entry["nats"])
        assert entry["bits_per_dim"] == pytest.approx(entry["nats"] / (2 * math.log(2)))
    assert metrics["val_nll"]["nats"] == pytest.approx(min(metrics["history"]["val_nll"]))
    assert len(metrics["history"]["train_nll"]) == metrics["epochs"] == 3
    assert metrics["parameters"] > 0 and metrics["wall_seconds"] > 0
    assert {"pyro_lunet", "torch", "pyro", "numpy", "python"} <= set(metrics["versions"])
    for png in moons_run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_prints_progress_and_summary(tmp_path):
    done = cli("fit", "moons", "--rows", 300, "--epochs", 2, "--out", tmp_path / "run")
    assert "epoch 2/2" in done.stderr and "val NLL" in done.stderr  # the live bar
    assert "validation NLL" in done.stdout and f"wrote {tmp_path / 'run'}/" in done.stdout


def test_fit_default_folder_is_never_reused(tmp_path):
    for expected in ("runs/moons/", "runs/moons-2/"):
        out = cli("fit", "moons", "--rows", 200, "--epochs", 1, "--quiet", cwd=tmp_path).stdout
        assert f"wrote {expected}" in out


def test_fit_refuses_existing_folder_and_overwrite_replaces_only_a_run(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert "already exists" in fails("fit", "moons", "--rows", 200, "--epochs", 1, "--out", out)
    assert "not a run folder" in fails("fit", "moons", "--rows", 200, "--epochs", 1, "--out", out,
                                       "--overwrite")  # fmt: skip
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    for _ in range(2):  # into the empty folder, then over the run written there
        cli("fit", "moons", "--rows", 200, "--epochs", 1, "--quiet", "--out", out, "--overwrite")
        assert {p.name for p in out.iterdir()} == FITTED_FILES | {"density.png"}
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no scratch left behind


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_fit_leaves_no_checkpoint(tmp_path, sig):
    out = tmp_path / "run"
    args = ["fit", "moons", "--rows", 20000, "--epochs", 200, "--out", out]

    # A shell starts background jobs with SIGINT ignored, and a child inherits that (Python
    # then installs no KeyboardInterrupt handler): give the command the default, as a
    # terminal's Ctrl-C finds it, however the test suite itself was started.
    def default_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([SCRIPT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=default_sigint)  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".run.*")):  # the scratch folder exists once fitting starts
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
        assert list(tmp_path.iterdir()) == []


def test_fit_images_write_a_sample_grid(tmp_path):
    images = np.random.default_rng(0).normal(size=(300, 4, 4))
    np.save(tmp_path / "images.npy", images)
    cli("fit", tmp_path / "images.npy", "--epochs", 1, "--quiet", "--out", tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == FITTED_FILES | {"samples.png"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_shape"] == [4, 4]


@pytest.mark.slow
def test_fit_digits(tmp_path):
    cli("fit", "digits", "--epochs", 1, "--blocks", 1, "--quiet", "--out", tmp_path / "run")
    assert (tmp_path / "run" / "samples.png").exists()


def test_scores_are_in_the_data_units(tmp_path):
    """Fitting the same rows in other units shifts every log-density by -D log(c)."""
    rows = np.random.default_rng(1).gamma(2.0, size=(400, 3))
    for name, scale in (("unit", 1.0), ("milli", 1000.0)):
        np.save(tmp_path / f"{name}.npy", rows * scale)
        cli("fit", tmp_path / f"{name}.npy", "--epochs", 2, "--quiet", "--dtype", "float64",
            "--out", tmp_path / name)  # fmt: skip
    score = {
        name: read_csv(cli("score", tmp_path / name, tmp_path / f"{name}.npy").stdout)[1][:, 1]
        for name in ("unit", "milli")
    }
    np.testing.assert_allclose(score["milli"], score["unit"] - 3 * math.log(1000.0), rtol=1e-9)


# ------------------------------------------------------------ score, sample
def test_sample_then_score_round_trip(moons_run, tmp_path):
    header, rows = read_csv(cli("sample", moons_run, "-n", 7).stdout)
    assert header == ["x1", "x2"] and rows.shape == (7, 2)
    assert np.array_equal(rows, read_csv(cli("sample", moons_run, "-n", 7).stdout)[1])  # seeded
    cli("sample", moons_run, "-n", 50, "-o", tmp_path / "draws.npy", "--seed", 3)
    draws = np.load(tmp_path / "draws.npy")
    assert draws.shape == (50, 2) and np.isfinite(draws).all()
    cli("sample", moons_run, "-n", 50, "-o", tmp_path / "draws.csv", "--seed", 3)
    assert np.array_equal(read_csv((tmp_path / "draws.csv").read_text())[1], draws)
    cli("score", moons_run, tmp_path / "draws.csv", "-o", tmp_path / "scores.csv")
    header, table = read_csv((tmp_path / "scores.csv").read_text())
    assert header == ["row", "log_prob"] and np.array_equal(table[:, 0], np.arange(1, 51))
    cli("score", moons_run, tmp_path / "draws.npy", "-o", tmp_path / "scores.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), table[:, 1])


def test_score_matches_the_model_rebuilt_in_process(moons_run, tmp_path):
    import torch

    from pyro_lunet.cli.checkpoint import load_model

    rows = np.random.default_rng(2).normal(size=(64, 2))
    np.savetxt(tmp_path / "rows.csv", rows, delimiter=",", header="a,b", comments="")
    _, table = read_csv(cli("score", moons_run, tmp_path / "rows.csv").stdout)
    model, _ = load_model(moons_run)
    with torch.no_grad():
        expected = model.log_prob(torch.as_tensor(rows, dtype=torch.float32)).double().numpy()
    np.testing.assert_array_equal(table[:, 1], expected)


def test_score_drops_nonfinite_rows_only_when_asked(moons_run, tmp_path):
    (tmp_path / "gappy.csv").write_text("1,2\nnan,2\n3,4\n5,inf\n0.5,0.5\n")
    message = fails("score", moons_run, tmp_path / "gappy.csv")
    assert "2 rows hold NaN or infinite values (first: row 2)" in message
    assert "--drop-nonfinite" in message
    done = cli("score", moons_run, tmp_path / "gappy.csv", "--drop-nonfinite")
    assert np.array_equal(read_csv(done.stdout)[1][:, 0], [1, 3, 5])
    assert "2 dropped" in done.stderr


def test_fit_reports_dropped_rows(tmp_path):
    rows = np.random.default_rng(3).normal(size=(200, 2))
    rows[[5, 17], 1] = np.nan
    np.save(tmp_path / "gappy.npy", rows)
    assert "NaN or infinite" in fails("fit", tmp_path / "gappy.npy", "--out", tmp_path / "run")
    done = cli("fit", tmp_path / "gappy.npy", "--drop-nonfinite", "--epochs", 1, "--quiet",
               "--out", tmp_path / "run")  # fmt: skip
    assert "dropped 2 rows" in done.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["dropped"] == 2


def test_existing_output_file_is_not_overwritten(moons_run, tmp_path):
    target = tmp_path / "draws.csv"
    target.write_text("mine\n")
    assert "already exists" in fails("sample", moons_run, "-n", 3, "-o", target)
    assert target.read_text() == "mine\n"
    cli("sample", moons_run, "-n", 3, "-o", target, "--overwrite")
    assert read_csv(target.read_text())[1].shape == (3, 2)


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "content, expected",
    [
        ("1,2\n3,abc\n", "line 2, column 2: 'abc' is not a number"),
        ("1,2\n3,\n", "line 2, column 2: '' is not a number"),
        ("1,2\n3,4,5\n", "line 2: 3 values, expected 2"),
        ("x,y\n", "no rows of numbers"),
    ],
    ids=["text", "empty-cell", "ragged", "header-only"],
)
def test_malformed_csv(moons_run, tmp_path, content, expected):
    (tmp_path / "bad.csv").write_text(content)
    assert expected in fails("score", moons_run, tmp_path / "bad.csv")


def test_missing_and_unreadable_files(moons_run, tmp_path):
    assert "no such file" in fails("score", moons_run, tmp_path / "absent.csv")
    assert "no such file" in fails("fit", tmp_path / "absent.npy")
    assert "is a folder" in fails("score", moons_run, tmp_path)
    (tmp_path / "rows.txt").write_text("1,2\n")
    assert "unknown file type" in fails("score", moons_run, tmp_path / "rows.txt")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    assert "not a numeric NumPy file" in fails("score", moons_run, tmp_path / "junk.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "not a numeric NumPy file" in fails("score", moons_run, tmp_path / "objects.npy")
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "locked.csv").write_text("1,2\n")
        (tmp_path / "locked.csv").chmod(0)
        assert "cannot read" in fails("score", moons_run, tmp_path / "locked.csv")


def test_array_shapes_and_npz_members(moons_run, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(5))
    assert "expected an (N, D) array" in fails("score", moons_run, tmp_path / "flat.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)), b=np.ones((3, 2)))
    assert "pick one with --key" in fails("score", moons_run, tmp_path / "two.npz")
    assert "no array 'c'" in fails("score", moons_run, tmp_path / "two.npz", "--key", "c")
    done = cli("score", moons_run, tmp_path / "two.npz", "--key", "b")
    assert read_csv(done.stdout)[1].shape == (3, 2)


def test_width_must_match_the_checkpoint(moons_run, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((4, 3)))
    message = fails("score", moons_run, tmp_path / "wide.npy")
    assert "rows have 3 values, but the checkpoint" in message and "takes 2" in message


def test_bad_checkpoints(tmp_path, moons_run):
    assert "not a checkpoint" in fails("sample", tmp_path, "-n", 3)
    broken = tmp_path / "broken"
    shutil.copytree(moons_run, broken)
    (broken / "model.pt").write_bytes(b"truncated")
    assert "damaged checkpoint" in fails("sample", broken, "-n", 3)


def test_bad_options(moons_run, tmp_path):
    message = fails("fit", "moons", "--flow", "coupling:dense")
    assert "unknown flow 'coupling:dense'" in message and "butterfly" in message
    assert "unknown flow" in fails("fit", "moons", "--flow", "glow")
    assert "CUDA is not available" in fails("fit", "moons", "--device", "cuda") or (
        __import__("torch").cuda.is_available()
    )
    assert "unknown device" in fails("fit", "moons", "--device", "abacus")
    assert "positive integer" in fails("fit", "moons", "--epochs", "0")
    assert "fraction in (0, 1)" in fails("fit", "moons", "--val-fraction", "1.5")
    assert "-n must be a positive" in fails("sample", moons_run, "-n", "0")
    assert "unknown output type" in fails("sample", moons_run, "-n", "2", "-o", tmp_path / "x.txt")
    assert "the following arguments are required" in fails("score", moons_run)


def test_data_that_cannot_be_fitted(tmp_path):
    np.save(tmp_path / "one.npy", np.random.default_rng(0).normal(size=(50, 1)))
    assert "cannot build coupling:lu for 1 columns" in fails(
        "fit", tmp_path / "one.npy", "--flow", "coupling:lu", "--out", tmp_path / "run"
    )
    constant = np.column_stack([np.arange(50.0), np.zeros(50)])
    np.save(tmp_path / "constant.npy", constant)
    assert "column 2 constant" in fails("fit", tmp_path / "constant.npy")
    np.save(tmp_path / "few.npy", np.zeros((3, 2)))
    assert "need at least 10" in fails("fit", tmp_path / "few.npy")
    message = fails("fit", "moons", "--rows", 200, "--epochs", 1, "--lr", "1e30", "--quiet",
                    "--out", tmp_path / "run")  # fmt: skip
    assert "training diverged in epoch 1" in message and "smaller learning rate" in message
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------- bench, demo
def test_bench_prints_the_table():
    out = cli("bench", "--dims", 8, "--batch", 16, "--repeats", 1, "--min-seconds", 0.001,
              "--only", "circulant").stdout  # fmt: skip
    assert "D=8, B=16" in out and "circulant" in out
    passes = out.split("elementwise passes", 1)[1]  # each step in units of one pass
    assert int(passes.split("circulant", 1)[1].split()[0]) >= 1
    assert "no layer: Pyro's base alone" in passes  # the floor under every Pyro row
    assert "Targets:" not in out  # the project's targets live in benchmarks/, not the package


def test_bench_layers_script_checks_the_targets(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layers.py"
    args = [script, "--dims", 8, "--batch", 16, "--repeats", 1, "--min-seconds", 0.001,
            "--only", "circulant", "--json", tmp_path / "bench.json"]  # fmt: skip
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Targets:" in done.stdout and "[n/a ]" in done.stdout  # D=1024 not measured
    assert json.loads((tmp_path / "bench.json").read_text())["targets"]


def _benchmark_module(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_layer_targets_count_passes_and_growth():
    targets = _benchmark_module("targets")

    def dim_entry(scale, one_pass):
        rows = {"butterfly": 0.03 * scale, "circulant": 0.02 * scale, "nflows": 0.1}
        tasks = ("density", "guide", "sample", "score")
        return {"times": {task: dict(rows) for task in tasks}, "pass": one_pass}

    results = {"dims": {1024: dim_entry(1.0, 1e-3), 4096: dim_entry(4.5, 1e-3)}}
    outcome = {t.label: (ratio, ok) for t, ratio, ok in targets.check_targets(results)}
    assert outcome["butterfly passes, density step"] == (pytest.approx(30.0), True)
    assert outcome["butterfly density step"] == (pytest.approx(0.3), False)
    assert outcome["circulant growth D=1024 -> 4096, guide step"] == (pytest.approx(4.5), True)
    assert outcome["LU default density step"] == (None, None)  # no LU row: not measured


def test_small_d_targets_leave_out_the_references_and_peers():
    small_d = _benchmark_module("bench_small_d")
    rows = {small_d.FLOW_REFERENCE: (1e-3, 1.0, 63), "lu_net(D, 4)": (9e-4, 0.9, 21),
            "zuko MAF x3": (6e-3, 6.0, None), "coupling_flow[lu]": (2e-3, 2.0, 25)}  # fmt: skip
    layer_rows = {small_d.LAYER_REFERENCE: (1e-3, 1.0, 20), "butterfly": (1.2e-3, 1.2, 36),
                  f"butterfly{small_d.ASSEMBLY}": (5e-4, 0.5, None)}  # fmt: skip
    results = {(10, "guide", "flows"): rows, (64, "guide", "flows"): rows,
               (64, "guide", "layers"): layer_rows}  # fmt: skip
    assert small_d.check_targets(results) == [
        ("lu_net(D, 4) guide step at D=10", 0.9, True),
        ("coupling_flow[lu] guide step at D=10", 2.0, False),
        ("butterfly guide step at D=64, one layer", 1.2, False),
    ]


def test_demo_writes_its_folder_and_says_where(tmp_path):
    for expected in ("pyro-lunet-demo", "pyro-lunet-demo-2"):
        done = cli("demo", "--rows", 1000, "--epochs", 1, "--quiet", cwd=tmp_path)
        assert f"wrote {expected}/" in done.stdout and "true density" in done.stdout
        assert "above the true density's" in done.stdout and "next: " in done.stdout
        assert {p.name for p in (tmp_path / expected).iterdir()} >= FITTED_FILES
