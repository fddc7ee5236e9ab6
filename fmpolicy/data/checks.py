"""Checks that a dataset is sound, run when it is opened (and on what a writer is given).

A bad dataset fails when it is opened, with a `DatasetError` that names the file, the episode, the
frame and the column, instead of many steps into training as a NaN loss or a batch of the wrong shape.

The column checks take arrays and a `where` that names the rows' origin, and know nothing of the file
layout. `where` is a text (the rows are the frames of one episode, e.g. "data file
.../file-000.parquet (episode 3)") or a function row -> (text, frame) for rows that concatenate many episodes: a reader checks all frames at once, and
only a failure pays for finding its episode. The checks are vectorised, so opening a dataset stays
about as fast as reading it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from fmpolicy.batch import IMAGES_PREFIX
from fmpolicy.errors import DatasetError

# A state or action value beyond this is taken as corrupt: the raw units of the robots we train on
# stay far below it, while overflows and uninitialised memory do not.
MAX_ABS_VALUE = 1e6
# dtypes of the arrays a writer records (images uint8; LeRobot's info.json then says image / video).
DTYPES = frozenset({"float32", "int64", "bool", "uint8"})
# Where checked rows come from: a text, or row -> (text, frame within that episode).
Where = str | Callable[[int], tuple[str, int]]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _at(where: Where, row: int, column: str) -> str:
    if callable(where):
        where, row = where(row)
    return f"{where}, frame {row}, column {column!r}"


# ---- columns -----------------------------------------------------------------------------------

def list_column_to_numpy(col: pa.Array | pa.ChunkedArray, width: int, column: str, where: str) -> np.ndarray:
    """(n, width) float32 values of a list column, after checking that every row holds exactly
    `width` values. The check reads each row's offsets, not only the total: rows of 3 and 1 values
    where 2 are expected have the right total, and reshaping them would shift values between rows."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DatasetError(f"{_at(where, row, column)}: the row is null: expected {width} values")
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != width:
            raise DatasetError(f"{_at(where, 0, column)}: has {col.type.list_size} values: expected {width}")
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        sizes = np.diff(col.offsets.to_numpy())
        bad = np.flatnonzero(sizes != width)
        if bad.size:
            row = int(bad[0])
            raise DatasetError(f"{_at(where, row, column)}: has {sizes[row]} values: expected {width}")
    else:
        raise DatasetError(f"{where}, column {column!r} has arrow type {col.type}: "
                           f"expected a list of {width} numbers per frame")
    values = col.flatten()
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DatasetError(f"{where}, column {column!r} holds {values.type} values: expected numbers")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, width)


def check_values(x: np.ndarray, column: str, where: Where, limit: float = MAX_ABS_VALUE) -> None:
    """Every value of x (n, ...) (n frames) is finite and |x| <= limit."""
    ok = np.abs(x) <= limit  # False for NaN
    if ok.all():
        return
    row, *dim = (int(i) for i in np.argwhere(~ok)[0])
    value = x[(row, *dim)]
    what = "not finite" if not np.isfinite(value) else f"beyond the bound |x| <= {limit:g}"
    raise DatasetError(f"{_at(where, row, column)}, dimension {dim[0] if len(dim) == 1 else tuple(dim)}: "
                       f"the value {value} is {what}")


def check_equal(values: np.ndarray, expected: np.ndarray | int, column: str, where: Where) -> None:
    """An index column holds what the meta files imply: frame_index 0..T-1 within each episode,
    episode_index the episode's number."""
    bad = np.flatnonzero(np.asarray(values) != expected)
    if bad.size:
        row = int(bad[0])
        want = expected if np.ndim(expected) == 0 else expected[row]
        raise DatasetError(f"{_at(where, row, column)}: is {values[row]}: expected {want}")


def check_known(values: np.ndarray, known: Iterable[int], column: str, where: Where, listed_in: str) -> None:
    """Every row of an index column (e.g. task_index) is one of `known` (the rows of `listed_in`)."""
    known = np.fromiter(known, np.int64)
    bad = np.flatnonzero(~np.isin(values, known))
    if bad.size:
        row = int(bad[0])
        raise DatasetError(f"{_at(where, row, column)}: {values[row]} is not in {listed_in} "
                           f"(it has {sorted(known.tolist())})")


# ---- meta files --------------------------------------------------------------------------------

def check_shape(shape: Any, where: str) -> list[int]:
    """A feature shape: a non-empty list of positive ints (numpy ints and tuples accepted)."""
    if not isinstance(shape, (list, tuple)) or not shape or not all(_is_int(s) and s >= 1 for s in shape):
        raise DatasetError(f"{where}.shape is {shape!r}: expected a non-empty list of positive ints")
    return [int(s) for s in shape]


def check_features(features: Any, where: str) -> dict[str, dict[str, Any]]:
    """The features a writer is given: {key: {"dtype", "shape"}} with known dtypes and valid shapes; `observation.state` and `action`
    present as float32 vectors; images (`observation.images.*`) uint8 [3, H, W]. Returns a normalised copy."""
    if not isinstance(features, Mapping):
        raise DatasetError(f"{where} features is {type(features).__name__}: "
                           "expected a mapping of key -> {dtype, shape}")
    out = {}
    for key, ft in features.items():
        at = f"{where} features[{key!r}]"
        if not isinstance(ft, Mapping) or "dtype" not in ft or "shape" not in ft:
            raise DatasetError(f"{at} is {ft!r}: expected {{'dtype': ..., 'shape': [...]}}")
        if ft["dtype"] not in DTYPES:
            raise DatasetError(f"{at}.dtype is {ft['dtype']!r}: expected one of {sorted(DTYPES)}")
        out[key] = {"dtype": str(ft["dtype"]), "shape": check_shape(ft["shape"], at)}
    for key in ("observation.state", "action"):
        if key not in out:
            raise DatasetError(f"{where} features lack {key!r} (they have {sorted(out)})")
        if out[key]["dtype"] != "float32" or len(out[key]["shape"]) != 1:
            raise DatasetError(f"{where} features[{key!r}] is {out[key]}: expected float32 of shape [d]")
    for key, ft in out.items():
        if key.startswith(IMAGES_PREFIX) and (ft["dtype"] != "uint8" or len(ft["shape"]) != 3 or ft["shape"][0] != 3):
            raise DatasetError(f"{where} features[{key!r}] is {ft}: an image must be uint8 of shape [3, H, W]")
    return out
