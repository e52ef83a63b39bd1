"""What users ran into: files that read wrong, options that crashed, --overwrite that deleted
their data. Everything runs in-process through ``main`` on tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_lunet import cli
from pyro_lunet.cli import commands
from pyro_lunet.cli.checkpoint import RUN_MARKER, CheckpointError, write_folder
from pyro_lunet.cli.data_files import load_rows

ROWS = np.random.default_rng(0).normal(size=(40, 3))  # 3-D: no density map to draw


def refused(capsys, *argv) -> str:
    """Runs a command that must fail with one line on stderr, exit status 2, no traceback."""
    capsys.readouterr()
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def ok(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def scores(text: str) -> np.ndarray:
    return np.loadtxt(text.splitlines(), delimiter=",", skiprows=1, ndmin=2)


def save_csv(path: Path, rows: np.ndarray, header: str | None = None, encoding="utf-8") -> Path:
    lines = ([header] if header else []) + [",".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    data = save_csv(folder / "rows.csv", ROWS)
    assert cli.main(["fit", str(data), "--epochs", "1", "--blocks", "1", "--quiet",
                     "--out", str(folder / "run")]) == 0  # fmt: skip
    return folder / "run"


# ---------------------------------------------------------------- 1. BOM
@pytest.mark.parametrize("header", [None, "a,b,c"], ids=["no-header", "header"])
def test_excel_csv_utf8_keeps_every_row(run, tmp_path, capsys, header):
    plain = save_csv(tmp_path / "plain.csv", ROWS[:20])
    excel = save_csv(tmp_path / "excel.csv", ROWS[:20], header, encoding="utf-8-sig")
    assert excel.read_bytes().startswith(b"\xef\xbb\xbf")
    table = scores(ok(capsys, "score", run, excel))
    assert np.array_equal(table[:, 0], np.arange(1, 21))  # 20 rows, each its own number
    np.testing.assert_array_equal(table, scores(ok(capsys, "score", run, plain)))


def test_excel_csv_utf8_single_column(tmp_path):
    """The reported case: one column, no header, the marked first cell read as a header."""
    excel = save_csv(tmp_path / "excel.csv", ROWS[:20, :1], encoding="utf-8-sig")
    np.testing.assert_array_equal(load_rows(str(excel)).values, ROWS[:20, :1])


# ------------------------------------------------- 2. nothing left to train
def test_val_fraction_that_leaves_no_training_rows(tmp_path, capsys):
    data = save_csv(tmp_path / "rows.csv", ROWS[:20])
    for extra in ([], ["--epochs", "1"]):  # the default epochs divided by zero steps
        message = refused(capsys, "fit", data, "--val-fraction", "0.99", *extra,
                          "--out", tmp_path / "run")  # fmt: skip
        assert "holds out 20 of the 20 rows, leaving 0 to train on" in message
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------- 3. MPS
@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_unavailable_mps_is_refused_like_cuda(run, tmp_path, capsys):
    message = refused(capsys, "fit", "moons", "--rows", 50, "--device", "mps",
                      "--out", tmp_path / "run")  # fmt: skip
    assert "device 'mps' asked for, but MPS is not available here" in message
    assert "MPS is not available" in refused(capsys, "sample", run, "-n", 2, "--device", "mps")


# -------------------------------------------------------- 4. huge samples
def test_sample_more_than_the_disk_holds(run, tmp_path, capsys):
    message = refused(capsys, "sample", run, "-n", 10**12, "-o", tmp_path / "draws.npy")
    assert "-n 1000000000000" in message and "GB" in message and "free" in message
    assert list(tmp_path.iterdir()) == []


def test_samples_stream_in_chunks(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "SAMPLE_CHUNK", 10)  # 3 rows of 3 values per draw
    ok(capsys, "sample", run, "-n", 23, "-o", tmp_path / "draws.npy")
    ok(capsys, "sample", run, "-n", 23, "-o", tmp_path / "draws.csv")
    draws = np.load(tmp_path / "draws.npy")
    assert draws.shape == (23, 3) and np.isfinite(draws).all()
    assert len(np.unique(draws[:, 0])) == 23  # every chunk fresh noise
    np.testing.assert_array_equal(scores((tmp_path / "draws.csv").read_text()), draws)
    np.testing.assert_array_equal(scores(ok(capsys, "sample", run, "-n", 23)), draws)


# ------------------------------------------------ 5. values beyond a dtype
def test_values_beyond_float32_are_named_not_blamed_on_the_lr(run, tmp_path, capsys):
    rows = ROWS.copy()
    rows[5, 0] = 1e39
    data = save_csv(tmp_path / "big.csv", rows)
    message = refused(capsys, "fit", data, "--epochs", 1, "--out", tmp_path / "run")
    assert "row 6, column 1: 1e+39 is beyond the range of float32" in message
    assert "--dtype float64" in message and "learning rate" not in message
    assert "row 6, column 1" in refused(capsys, "score", run, data)  # was a traceback
    ok(capsys, "fit", data, "--epochs", 1, "--blocks", 1, "--dtype", "float64", "--quiet",
       "--out", tmp_path / "run")  # fmt: skip


def test_standardization_that_overflows_is_named(tmp_path, capsys):
    rows = ROWS.copy()
    rows[5, 0] = 1e200  # finite in float64, its square is not
    data = save_csv(tmp_path / "huge.csv", rows)
    message = refused(capsys, "fit", data, "--dtype", "float64", "--out", tmp_path / "run")
    assert "column 1 (values up to 1e+200) overflows float64 when standardized" in message
    assert "constant" not in message
    rows = ROWS.copy()
    rows[:, 1] *= 1e-45  # a spread float32 cannot hold
    data = save_csv(tmp_path / "tiny.csv", rows)
    message = refused(capsys, "fit", data, "--out", tmp_path / "run")
    assert "column 2 varies by only" in message and "--dtype float64" in message


# --------------------------------------------------------- 6. --overwrite
def test_overwrite_never_deletes_the_users_files(tmp_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    data = save_csv(folder / "rows.csv", ROWS)
    (folder / "notes.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fit = ["fit", data, "--epochs", 1, "--blocks", 1, "--quiet", "--overwrite"]
    assert "would replace the input" in refused(capsys, *fit, "--out", folder)
    elsewhere = save_csv(tmp_path / "rows.csv", ROWS)
    message = refused(capsys, "fit", elsewhere, "--overwrite", "--out", folder)
    assert "not a run folder" in message
    (tmp_path / "file").write_text("mine")
    assert "not a folder" in refused(capsys, "fit", elsewhere, "--overwrite", "--out",
                                     tmp_path / "file")  # fmt: skip
    assert (tmp_path / "file").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_overwrite_replaces_a_run_until_the_user_adds_to_it(tmp_path, capsys):
    data = save_csv(tmp_path / "rows.csv", ROWS)
    fit = ["fit", data, "--epochs", 1, "--blocks", 1, "--quiet", "--overwrite",
           "--out", tmp_path / "run"]  # fmt: skip
    ok(capsys, *fit)
    ok(capsys, *fit)  # its own run folder: replaced
    assert (tmp_path / "run" / RUN_MARKER).exists()
    (tmp_path / "run" / "notes.txt").write_text("my notes")
    assert "holds 'notes.txt', added after" in refused(capsys, *fit)
    assert (tmp_path / "run" / "notes.txt").read_text() == "my notes"


def test_write_folder_checks_again_before_replacing(tmp_path):
    """A file added to the old run while the new one was being fitted survives."""
    out = tmp_path / "run"
    with write_folder(out) as scratch:
        (scratch / "model.pt").write_text("old")
    added = pytest.raises(CheckpointError, match="'notes.txt', added after")
    with added, write_folder(out, overwrite=True) as scratch:
        (scratch / "model.pt").write_text("new")
        (out / "notes.txt").write_text("written meanwhile")
    assert (out / "model.pt").read_text() == "old" and (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no scratch left behind


def test_score_output_never_replaces_its_input(run, tmp_path, capsys):
    data = save_csv(tmp_path / "rows.csv", ROWS[:10])
    before = data.read_bytes()
    (tmp_path / "link.csv").symlink_to(data)
    for name in (data, tmp_path / "link.csv"):
        message = refused(capsys, "score", run, data, "-o", name, "--overwrite")
        assert "would replace the input" in message
    assert data.read_bytes() == before
    out = tmp_path / "scores.csv"
    out.write_text("an old output\n")
    ok(capsys, "score", run, data, "-o", out, "--overwrite")  # a plain output: replaced
    assert scores(out.read_text()).shape == (10, 2)


# ------------------------------------------------- 7. one line, exit 2, always
@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "{data}", "--val-fraction", "0.99", "--out", "{tmp}/run"],
        ["fit", "{data}", "--device", "mps", "--out", "{tmp}/run"],
        ["fit", "{data}", "--device", "tpu", "--out", "{tmp}/run"],
        ["fit", "{tmp}/big.csv", "--epochs", "1", "--out", "{tmp}/run"],
        ["fit", "{data}", "--out", "{tmp}", "--overwrite"],
        ["sample", "{run}", "-n", "1000000000000", "-o", "{tmp}/draws.npy"],
        ["sample", "{run}", "-n", "3", "-o", "{tmp}/no/such/folder/draws.csv"],
        ["sample", "{run}", "-n", "3", "--seed", str(2**70)],
        ["score", "{run}", "{tmp}/big.csv"],
        ["score", "{run}", "{data}", "-o", "{data}", "--overwrite"],
    ],
)
def test_bad_invocations_are_one_line(run, tmp_path, capsys, argv):
    if "mps" in argv and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    data = save_csv(tmp_path / "rows.csv", ROWS[:20])
    save_csv(tmp_path / "big.csv", np.vstack([ROWS, [[1e39, 0.0, 0.0]]]))
    before = sorted(tmp_path.iterdir())
    argv = [a.format(data=data, run=run, tmp=tmp_path) for a in argv]
    assert refused(capsys, *argv).startswith(f"pyro-lunet {argv[0]}: error: ")
    assert sorted(tmp_path.iterdir()) == before  # nothing written, nothing removed


def test_fit_density_refusals_and_internal_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """An unforeseen error is one line (exit 1); fit_density's own refusals are refusals."""

    def broken(*args, **kwargs):
        raise TypeError("something we did not foresee\nsecond line")

    monkeypatch.setattr(commands, "fit_density", broken)
    monkeypatch.delenv("PYRO_LUNET_TRACEBACK", raising=False)
    code = cli.main(["fit", "moons", "--rows", "60", "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1 and "internal error: TypeError: something" in err

    def refuses(*args, **kwargs):
        raise ValueError("data column 1 is constant (every training row is 2)")

    monkeypatch.setattr(commands, "fit_density", refuses)
    code = cli.main(["fit", "moons", "--rows", "60", "--epochs", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "column 1 is constant" in err
