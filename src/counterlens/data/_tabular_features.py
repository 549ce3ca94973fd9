"""The columns of a table: :class:`Feature` (one feature's kind, range, categories, scale), and how
one is inferred from a pandas column; the CSV reader. :mod:`counterlens.data.tabular` builds the
schema from these."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataFileError, InputError

KINDS = ("continuous", "integer", "categorical")
MONOTONE = ("increase", "decrease")
N_QUANTILES = 101    # stored per numeric feature: the marginal a black-box search samples from


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature. ``low``/``high``/``scale``/``mean``/``std``/``quantiles``: numeric only;
    ``categories`` (one-hot order), ``frequencies`` (in the data) and ``allowed`` (categories a
    counterfactual may take; None: all): categorical only."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    categories: tuple | None = None
    immutable: bool = False
    monotone: str | None = None
    scale: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    quantiles: tuple | None = None
    frequencies: tuple | None = None
    allowed: tuple | None = None

    @property
    def numeric(self) -> bool:
        return self.kind != "categorical"

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind == "categorical" else 1


def mad_scale(values: np.ndarray) -> float:
    """Median absolute deviation; the standard deviation when the MAD is 0; 1 when both are."""
    values = np.asarray(values, dtype=np.float64)
    mad = float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0
    if mad > 0:
        return mad
    std = float(values.std()) if values.size else 0.0
    return std if std > 0 else 1.0


# -- inference from a column --------------------------------------------------------------------------------------
def read_table(path) -> pd.DataFrame:
    """``pandas.read_csv(path)`` with a :class:`DataFileError` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(path, "no such file; pass a CSV table")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types on malformed files
        raise DataFileError(path, f"not a readable CSV table: {exc}") from exc
    if df.empty:
        raise DataFileError(path, "the table has no rows")
    return df


def _is_categorical(col: pd.Series) -> bool:
    return (pd.api.types.is_bool_dtype(col) or pd.api.types.is_object_dtype(col)
            or isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(col))


def _key(v):
    """Category lookup key: 1, 1.0 and numpy ints match; strings as they are."""
    if isinstance(v, (bool, np.bool_)):
        return ("b", bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)) and float(v) == int(v):
        return ("n", int(v))
    return ("s", str(v))


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _check_monotone(f: Feature, direction):
    if direction is None:
        return None
    if direction not in MONOTONE:
        raise InputError(f"monotone[{f.name!r}]={direction!r}; pass 'increase' or 'decrease'")
    if not f.numeric:
        raise InputError(f"monotone[{f.name!r}]: {f.name!r} is categorical; only numeric features can be monotone")
    return direction


def _range(name, kind, given, categories):
    """(low, high, allowed) from a user range: numbers for numeric, allowed values for categorical."""
    if kind == "categorical":
        allowed = {_key(v) for v in (given if isinstance(given, (list, tuple, set)) else [given])}
        unknown = allowed - {_key(c) for c in categories}
        if unknown or not allowed:
            raise InputError(f"ranges[{name!r}]={given!r}: pass a list of its categories {list(categories)}")
        return None, None, tuple(_key(c) in allowed for c in categories)
    try:
        lo, hi = (float(v) for v in given)
    except (TypeError, ValueError) as exc:
        raise InputError(f"ranges[{name!r}]={given!r}; pass (low, high) numbers") from exc
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"ranges[{name!r}]={given!r}; pass finite low <= high")
    return lo, hi, None


def _feature(name, kind, col: pd.Series, immutable, monotone, given_range, scale) -> Feature:
    if kind == "categorical":
        cats = sorted(pd.unique(col).tolist(), key=lambda v: (str(type(v)), str(v)))
        f = Feature(name, kind, categories=tuple(_plain(c) for c in cats), immutable=bool(immutable))
        counts = col.map(lambda v: _key(v)).value_counts()
        freq = tuple(float(counts.get(_key(c), 0)) / len(col) for c in f.categories)
        f = dataclasses.replace(f, frequencies=freq)
        if given_range is not None:
            f = dataclasses.replace(f, allowed=_range(name, kind, given_range, f.categories)[2])
        _check_monotone(f, monotone)
        return f
    try:
        values = col.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"column {name!r} ({col.dtype}) is not numeric; list it in categorical=[...]") from exc
    if not np.isfinite(values).all():
        raise InputError(f"column {name!r} has infinite values; clean the table first")
    low, high = float(values.min()), float(values.max())
    if given_range is not None:
        low, high, _ = _range(name, kind, given_range, None)
    if scale is None:
        scale = mad_scale(values)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"scales[{name!r}]={scale!r}; pass a positive number")
    std = float(values.std())
    quantiles = tuple(float(q) for q in np.quantile(values, np.linspace(0, 1, N_QUANTILES)))
    f = Feature(name, kind, low=low, high=high, immutable=bool(immutable), scale=float(scale),
                mean=float(values.mean()), std=std if std > 0 else 1.0, quantiles=quantiles)
    return dataclasses.replace(f, monotone=_check_monotone(f, monotone))
