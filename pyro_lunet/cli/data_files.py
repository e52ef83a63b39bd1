"""Rows of numbers from a CSV, NPY or NPZ file or a built-in data set, checked.

What the command line reads. Every way a file can be wrong (missing,
unreadable, ragged, non-numeric, the wrong shape, NaN or infinite values) is a
:class:`DataError` whose message names the file, the place and what was
expected, so the command line can print it as one line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import datasets

__all__ = [
    "BUILT_IN",
    "BUILT_IN_LEVELS",
    "DataError",
    "Rows",
    "check_levels",
    "check_range",
    "check_width",
    "load_rows",
    "standardization",
]


class DataError(ValueError):
    """A data source that cannot be read as rows of finite numbers."""


@dataclass
class Rows:
    """Rows read from one source.

    ``values`` is ``(N, D)`` float64 with every value finite; ``row_numbers``
    gives each kept row's 0-based position in the source (rows with NaN or
    infinite values may have been dropped); ``image_shape`` is set where a row
    is a flattened image.
    """

    values: np.ndarray
    source: str
    row_numbers: np.ndarray
    dropped: int = 0
    image_shape: tuple[int, ...] | None = None

    @property
    def dim(self) -> int:
        return self.values.shape[1]


def _digits(num_rows: int, seed: int, discrete: bool = False) -> np.ndarray:
    try:
        return datasets.digits(seed, dequantize=not discrete).double().numpy()
    except ImportError as error:
        raise DataError(f"digits: {error}") from None


def _toy(name: str):
    def load(num_rows: int, seed: int) -> np.ndarray:
        return datasets.TOY_DATA[name](num_rows, seed=seed).double().numpy()

    return load


#: Built-in data sets by name: ``name -> (loader(num_rows, seed), image shape)``.
#: The toy sets draw ``num_rows`` rows; the digits are a fixed 1797.
BUILT_IN = {
    **{name: (_toy(name), None) for name in datasets.TOY_DATA},
    "digits": (_digits, datasets.DIGITS_SHAPE),
}
#: The built-in discrete data sets' numbers of levels (values are integers ``0..L-1``);
#: with ``discrete=True`` :func:`load_rows` reads these as the integers themselves.
BUILT_IN_LEVELS = {"digits": datasets.DIGITS_LEVELS}


def load_rows(
    source: str, *, num_rows: int = 20000, seed: int = 0, drop_nonfinite: bool = False,
    key: str | None = None, discrete: bool = False,
) -> Rows:  # fmt: skip
    """Reads ``source``: a built-in name (:data:`BUILT_IN`) or a ``.csv``/``.npy``/``.npz`` path.

    ``discrete`` reads a built-in discrete data set (:data:`BUILT_IN_LEVELS`) as its
    integer levels rather than dequantized once; files are read as they are.

    A CSV holds one row per line, comma-separated, optionally under one header
    line of names. An NPY array (or an NPZ member, picked by ``key`` where the
    archive holds several) is ``(N, D)``, or ``(N, H, W)`` images, which are
    flattened and remembered as image-like. Rows holding NaN or infinite values
    are refused, or dropped (and counted) with ``drop_nonfinite``.

    :raises DataError: naming what is wrong and where.
    """
    if source in BUILT_IN:
        load, image_shape = BUILT_IN[source]
        values = (
            load(num_rows, seed, discrete) if source in BUILT_IN_LEVELS else load(num_rows, seed)
        )
        return Rows(values, source, np.arange(len(values)), image_shape=image_shape)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"{source}: no such file, and not a built-in data set (one of {', '.join(BUILT_IN)})"
        )
    if path.is_dir():
        raise DataError(f"{source}: is a folder; expected a .csv, .npy or .npz file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            values, image_shape = _read_csv(path), None
        elif suffix in (".npy", ".npz"):
            values, image_shape = _read_array(path, key)
        else:
            raise DataError(f"{source}: unknown file type {suffix!r}; expected .csv, .npy or .npz")
    except OSError as error:
        raise DataError(f"{source}: cannot read: {error.strerror or error}") from None
    return _finite_rows(values, source, image_shape, drop_nonfinite)


def _read_csv(path: Path) -> np.ndarray:
    # "utf-8-sig" drops the byte-order mark Excel's "CSV UTF-8" starts with; left in, it
    # glues to the first cell, which then reads as a header and the first row is lost.
    with path.open(newline="", encoding="utf-8-sig") as file:
        try:
            lines = [(number, row) for number, row in enumerate(csv.reader(file), 1) if row]
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if lines and not any(_is_number(cell) for cell in lines[0][1]):
        lines = lines[1:]  # a header of names
    if not lines:
        raise DataError(f"{path}: no rows of numbers")
    width = len(lines[0][1])
    for number, row in lines:
        if len(row) != width:
            raise DataError(f"{path}, line {number}: {len(row)} values, expected {width}")
    try:  # NumPy parses the strings in C; only a refusal needs the cell-by-cell pass
        return np.array([row for _, row in lines], dtype=np.float64)
    except ValueError:
        pass
    values = np.empty((len(lines), width))
    for i, (number, row) in enumerate(lines):
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}, line {number}, column {j + 1}: {cell!r} is not a number"
                ) from None
    return values


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_array(path: Path, key: str | None) -> tuple[np.ndarray, tuple[int, ...] | None]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as error:  # pickled objects, or not an array file at all
        raise DataError(f"{path}: not a numeric NumPy file ({error})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.files)
            if key is None and len(names) != 1:
                raise DataError(f"{path}: holds arrays {names}; pick one with --key")
            if key is not None and key not in names:
                raise DataError(f"{path}: no array {key!r}; it holds {names}")
            array = loaded[key or names[0]]
    else:
        array = loaded
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise DataError(f"{path}: expected real numbers, got dtype {array.dtype}")
    if array.ndim == 2:
        return array.astype(np.float64), None
    if array.ndim == 3:
        return array.reshape(len(array), -1).astype(np.float64), tuple(array.shape[1:])
    raise DataError(
        f"{path}: expected an (N, D) array of rows or (N, H, W) images, got shape {array.shape}"
    )


def _finite_rows(values: np.ndarray, source: str, image_shape, drop_nonfinite: bool) -> Rows:
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise DataError(f"{source}: no data (shape {values.shape})")
    bad = ~np.isfinite(values).all(axis=1)
    numbers = np.arange(len(values))
    if bad.any():
        count = int(bad.sum())
        if not drop_nonfinite:
            first = int(numbers[bad][0])
            raise DataError(
                f"{source}: {count} row{'s' * (count > 1)} hold NaN or infinite values "
                f"(first: row {first + 1}); pass --drop-nonfinite to drop them"
            )
        values, numbers = values[~bad], numbers[~bad]
        if len(values) == 0:
            raise DataError(f"{source}: every row holds NaN or infinite values")
    return Rows(values, source, numbers, int(bad.sum()), image_shape)


def check_width(rows: Rows, expected: int, what: str) -> None:
    """Refuses rows whose width is not ``expected`` (the width ``what`` takes)."""
    if rows.dim != expected:
        raise DataError(f"{rows.source}: rows have {rows.dim} values, but {what} takes {expected}")


def check_levels(rows: Rows, levels: int, what: str | None = None) -> None:
    """Refuses rows that are not integers in ``0..levels-1``, naming the first value that
    is not, where it is and what was expected."""
    what = what or f"--levels {levels}"
    values = rows.values
    bad = (values != np.floor(values)) | (values < 0) | (values > levels - 1)
    _refuse_first(
        rows, bad,
        lambda value: f"{value:g} is not an integer in 0..{levels - 1}; {what} takes integer "
        f"levels 0..{levels - 1} (the values here run from {values.min():g} to {values.max():g})",
    )  # fmt: skip


def _refuse_first(rows: Rows, bad: np.ndarray, describe) -> None:
    """A ``DataError`` naming the first value where ``bad`` holds, its place, and
    ``describe(value)``; nothing if there is none."""
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(
            f"{rows.source}: row {rows.row_numbers[i] + 1}, column {j + 1}: "
            + describe(rows.values[i, j])
        )


def standardization(rows: Rows, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations; refuses constant columns and values ``dtype``
    cannot hold.

    A constant column has no density to fit (the likelihood grows without
    bound as the model shrinks onto it), so it is an error, not a warning. The
    model computes ``(x - mean) / scale`` in ``dtype``: a value beyond its range
    becomes infinite there and training fails with NaN, which would otherwise
    be blamed on the learning rate.
    """
    check_range(rows, dtype)
    values, info = rows.values, np.finfo(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        mean, scale = values.mean(0), values.std(0)
        spread = np.abs(values - mean).max(0)
        in_dtype = scale.astype(dtype)
    wider = "pass --dtype float64 or " if info.max < np.finfo(np.float64).max else ""
    finite = np.isfinite(mean) & np.isfinite(scale)
    overflow = np.flatnonzero(~finite | (spread > info.max) | np.isinf(in_dtype))
    if len(overflow):
        c = overflow[0]
        raise DataError(
            f"{rows.source}: column {c + 1} (values up to {np.abs(values[:, c]).max():.3g}) "
            f"overflows {dtype} when standardized; {wider}rescale it"
        )
    constant = np.flatnonzero(~(scale > 0))
    if len(constant):
        cols = ", ".join(str(c + 1) for c in constant[:5]) + (", ..." if len(constant) > 5 else "")
        raise DataError(
            f"{rows.source}: column{'s' * (len(constant) > 1)} {cols} constant; "
            "a density over a constant column is degenerate: remove it"
        )
    tiny = np.flatnonzero(in_dtype < info.tiny)  # spread lost below dtype's normal numbers
    if len(tiny):
        c = tiny[0]
        raise DataError(
            f"{rows.source}: column {c + 1} varies by only {scale[c]:.3g}, below what {dtype} "
            f"resolves ({info.tiny:.3g}); {wider}rescale it"
        )
    return mean, scale


def check_range(rows: Rows, dtype: str) -> None:
    """Refuses a value beyond ``dtype``'s range (it would become infinite), naming its place.

    Only float32 has such values: beyond float64's range a value reads as infinite.
    """
    limit = np.finfo(dtype).max
    _refuse_first(
        rows, np.abs(rows.values) > limit,
        lambda value: f"{value:.3g} is beyond the range of {dtype} (±{limit:.3g}); fit with "
        "--dtype float64 or rescale the data",
    )  # fmt: skip
