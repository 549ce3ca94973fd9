"""Tables: a feature schema and the numeric rows a model and a counterfactual search work on.

:class:`TabularSchema` describes every feature of a table: continuous, integer or categorical; its
valid range (from the data unless given) or categories; whether it is immutable or monotone (may
only increase / decrease); and its distance scale (the median absolute deviation by default), in
which a counterfactual's cost is measured.

*Schema space* is the numeric form of a row, ``[N, D]`` float32, in the table's feature order:
a numeric feature is one column in its own raw units (data space, as in the CSV); a categorical
feature is a one-hot block, one column per category. ``encode`` and ``decode`` go between a
DataFrame and schema space. A tabular :class:`~counterlens.model.Classifier` takes schema-space
rows: put the standardisation the network needs into its ``preprocess`` (``schema.preprocess()``,
a portable :class:`~counterlens.model.Normalize`), e.g. ``schema.classifier(net)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ._tabular_features import (KINDS, MONOTONE, N_QUANTILES, Feature, _check_monotone, _feature,  # noqa: F401
                                _is_categorical, _key, _plain, _range, mad_scale, read_table)

class TabularSchema:
    """The features of a table (see the module docstring). Build it with :meth:`from_frame` or
    :meth:`from_csv`; it is immutable (:meth:`constrained` returns a new one)."""

    def __init__(self, features: Sequence[Feature], label: str | None = None, classes: Sequence | None = None):
        if not features:
            raise InputError("a schema needs at least one feature")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise InputError(f"feature names repeat: {names}")
        self.features = tuple(features)
        self.label = label
        self.classes = list(classes) if classes is not None else None
        self.slices, start = {}, 0
        for f in self.features:
            self.slices[f.name] = slice(start, start + f.width)
            start += f.width
        self.width = start

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_frame(cls, df: pd.DataFrame, label: str | None = None, *, categorical: Sequence[str] = (),
                   integer: Sequence[str] = (), immutable: Sequence[str] = (),
                   monotone: Mapping[str, str] | None = None, ranges: Mapping | None = None,
                   scales: Mapping[str, float] | None = None, drop: Sequence[str] = ()) -> TabularSchema:
        """A schema of every column of ``df`` but ``label`` and ``drop``.

        Kinds are inferred from dtypes (bool / object / string / category: categorical; integer:
        integer; float: continuous) unless listed in ``categorical`` or ``integer``.
        ``ranges``: ``{name: (low, high)}`` for numeric features (default: the data's min and max),
        ``{name: [allowed categories]}`` for categorical ones. ``monotone``: ``{name: "increase"
        | "decrease"}``. ``scales``: distance unit per numeric feature (default: its MAD).
        """
        if not isinstance(df, pd.DataFrame):
            raise InputError(f"from_frame needs a pandas DataFrame, got {type(df).__name__}")
        monotone, ranges, scales = dict(monotone or {}), dict(ranges or {}), dict(scales or {})
        columns = [c for c in df.columns if c != label and c not in set(drop)]
        if label is not None and label not in df.columns:
            raise InputError(f"label={label!r} is not a column; columns: {list(df.columns)}")
        for arg, names in (("categorical", categorical), ("integer", integer), ("immutable", immutable),
                           ("monotone", monotone), ("ranges", ranges), ("scales", scales)):
            unknown = [n for n in names if n not in columns]
            if unknown:
                raise InputError(f"{arg}: {unknown} are not feature columns; features: {columns}")
        features = []
        for name in columns:
            col = df[name]
            if col.isna().any():
                raise InputError(f"column {name!r} has {int(col.isna().sum())} missing values; fill or drop "
                                 "them (or pass drop=[...]) before building the schema")
            if name in categorical or (name not in integer and _is_categorical(col)):
                kind = "categorical"
            elif name in integer or pd.api.types.is_integer_dtype(col):
                kind = "integer"
            else:
                kind = "continuous"
            features.append(_feature(name, kind, col, name in immutable, monotone.get(name), ranges.get(name),
                                     scales.get(name)))
        classes = None
        if label is not None:
            classes = sorted(df[label].unique().tolist(), key=lambda v: (str(type(v)), v))
        return cls(features, label=label, classes=classes)

    @classmethod
    def from_csv(cls, path, label: str | None = None, **kwargs) -> TabularSchema:
        """:meth:`from_frame` of ``pandas.read_csv(path)``."""
        return cls.from_frame(read_table(path), label=label, **kwargs)

    def constrained(self, *, vary: Sequence[str] | None = None, immutable: Sequence[str] = (),
                    monotone: Mapping[str, str] | None = None, ranges: Mapping | None = None) -> TabularSchema:
        """A copy with more constraints: only ``vary`` may change (None: no restriction), ``immutable``
        may not, ``monotone`` / ``ranges`` as in :meth:`from_frame` (ranges narrow, never widen)."""
        monotone, ranges = dict(monotone or {}), dict(ranges or {})
        for arg, names in (("vary", vary or ()), ("immutable", immutable), ("monotone", monotone),
                           ("ranges", ranges)):
            unknown = [n for n in names if n not in self.slices]
            if unknown:
                raise InputError(f"{arg}: {unknown} are not features of the schema; features: {self.names}")
        out = []
        for f in self.features:
            fixed = f.immutable or f.name in immutable or (vary is not None and f.name not in vary)
            mono = _check_monotone(f, monotone.get(f.name, f.monotone))
            low, high, cats = f.low, f.high, f.categories
            new = dataclasses.replace(f, immutable=fixed, monotone=mono)
            if f.name in ranges:
                lo, hi, allowed = _range(f.name, f.kind, ranges[f.name], cats)
                if f.numeric:
                    lo, hi = max(lo, low), min(hi, high)
                    if lo > hi:
                        raise InputError(f"ranges[{f.name!r}]={ranges[f.name]!r} does not overlap the schema's "
                                         f"range [{low:g}, {high:g}]")
                else:
                    allowed = tuple(a and b for a, b in zip(allowed, f.allowed or allowed))
                new = dataclasses.replace(new, low=lo, high=hi, allowed=allowed)
            out.append(new)
        return TabularSchema(out, self.label, self.classes)

    # -- description -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def columns(self) -> list[str]:
        """Schema-space column names: ``age``, ``job=clerk``, ..."""
        return [f.name if f.numeric else f"{f.name}={c}" for f in self.features for c in (f.categories or [None])]

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise InputError(f"{name!r} is not a feature; features: {self.names}")

    def __len__(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        kinds = {k: sum(f.kind == k for f in self.features) for k in KINDS}
        return (f"TabularSchema({len(self)} features: " + ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
                + f"; width {self.width}; label={self.label!r})")

    def column_feature(self) -> torch.Tensor:
        """``[D]`` the feature index of every schema-space column."""
        return torch.tensor([i for i, f in enumerate(self.features) for _ in range(f.width)])

    def vector(self, attr: str, default: float = 0.0) -> torch.Tensor:
        """``[D]`` float64 of a numeric attribute per column (``default`` on one-hot columns)."""
        return torch.tensor([getattr(f, attr) if f.numeric else default for f in self.features
                             for _ in range(f.width)], dtype=torch.float64)

    def to_dict(self) -> dict:
        """JSON / YAML-able form (for ``run.yaml``); :meth:`from_dict` reads it back."""
        feats = []
        for f in self.features:
            d = {k: v for k, v in dataclasses.asdict(f).items() if v is not None and k not in ("quantiles",)}
            for key in ("categories", "frequencies", "allowed"):
                if key in d:
                    d[key] = [_plain(v) for v in d[key]]
            if f.quantiles is not None:
                d["quantiles"] = [float(q) for q in f.quantiles]
            feats.append(d)
        return {"label": self.label, "classes": [_plain(c) for c in self.classes] if self.classes else None,
                "features": feats}

    def save(self, path) -> Path:
        """Write the schema as JSON, e.g. next to the model trained with it (``credit.pt2`` ->
        ``credit.schema.json``, which ``counterlens counterfactual --table`` then finds), so that a
        table read later is encoded into the same slots (same categories, same order)."""
        import json
        path = Path(path)
        path.write_text(json.dumps({"counterlens_schema": 1, **self.to_dict()}, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> TabularSchema:
        """The schema :meth:`save` wrote."""
        import json
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(d, dict) or "features" not in d:
                raise ValueError("no 'features'")
            return cls.from_dict({k: v for k, v in d.items() if k != "counterlens_schema"})
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: not a counterlens table schema ({exc}); write one with "
                             "TabularSchema.save(path)") from exc

    @classmethod
    def from_dict(cls, d: Mapping) -> TabularSchema:
        feats = [Feature(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in f.items()})
                 for f in d["features"]]
        return cls(feats, d.get("label"), d.get("classes"))

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, X, *, strict: bool = True) -> torch.Tensor:
        """Schema-space rows ``[N, D]`` float32 of ``X``: a DataFrame (label column ignored), a
        Series (one row), or an array / tensor already in schema space ``[N, D]`` (checked).

        ``strict=False`` (for checking other tools' output): an unknown category gives an all-zero
        one-hot block and a non-numeric or missing value NaN, instead of an error."""
        if isinstance(X, pd.Series):
            X = X.to_frame().T
        if not isinstance(X, pd.DataFrame):
            t = torch.as_tensor(np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X)
            t = t.detach().float().cpu()
            if t.dim() == 1:
                t = t[None]
            if t.dim() != 2 or t.shape[1] != self.width:
                raise InputError(f"X has shape {tuple(t.shape)}; pass a DataFrame with columns {self.names[:6]}"
                                 f"{'...' if len(self) > 6 else ''} or schema-space rows [N, {self.width}]")
            if strict and not torch.isfinite(t).all():
                raise InputError("X contains NaN or infinite values; clean the rows first")
            return t
        missing = [n for n in self.names if n not in X.columns]
        if missing:
            raise InputError(f"X lacks the feature columns {missing}; pass a DataFrame with every feature of the schema")
        out = np.zeros((len(X), self.width), dtype=np.float32)
        for f in self.features:
            col, sl = X[f.name], self.slices[f.name]
            if strict and col.isna().any():
                raise InputError(f"X[{f.name!r}] has missing values; fill or drop those rows")
            if f.numeric:
                if not strict:
                    out[:, sl.start] = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
                    continue
                try:
                    out[:, sl.start] = col.to_numpy(dtype=np.float64)
                except (TypeError, ValueError) as exc:
                    raise InputError(f"X[{f.name!r}] is not numeric ({col.dtype}); the schema has it as {f.kind}") from exc
                continue
            index = {_key(c): i for i, c in enumerate(f.categories)}
            codes = [index.get(_key(v), -1) for v in col.tolist()]
            bad = sorted({str(v) for v, c in zip(col.tolist(), codes) if c < 0})
            if not strict:
                rows = np.flatnonzero(np.asarray(codes) >= 0)
                out[rows, sl.start + np.asarray(codes, dtype=np.int64)[rows]] = 1.0
                continue
            if bad:
                raise InputError(f"X[{f.name!r}] has categories {bad[:5]} the schema does not know "
                                 f"(known: {list(f.categories)[:10]}); rebuild the schema from data that has them")
            out[np.arange(len(X)), sl.start + np.asarray(codes, dtype=np.int64)] = 1.0
        if strict and not np.isfinite(out).all():
            raise InputError("X contains infinite values; clean the rows first")
        return torch.from_numpy(out)

    def decode(self, x, *, tidy: bool = True) -> pd.DataFrame:
        """A DataFrame of schema-space rows ``[N, D]``: each one-hot block to its most likely
        category, integer features rounded, the original value types. ``tidy``: continuous values
        as the shortest decimal their float32 holds (7.3, not 7.300000190734863)."""
        x = self.encode(x) if not isinstance(x, torch.Tensor) else x.detach().cpu().float()
        if x.dim() != 2 or x.shape[1] != self.width:
            raise InputError(f"x has shape {tuple(x.shape)}; expected schema-space rows [N, {self.width}]")
        data = {}
        for f in self.features:
            block = x[:, self.slices[f.name]].double().numpy()
            if f.kind == "continuous":
                data[f.name] = (block[:, 0].astype(np.float32).astype(str).astype(np.float64) if tidy
                                else block[:, 0])
            elif f.kind == "integer":
                data[f.name] = np.rint(block[:, 0]).astype(np.int64)
            else:
                data[f.name] = pd.Series([f.categories[i] for i in block.argmax(axis=1)], dtype=object)
        return pd.DataFrame(data)

    def encode_labels(self, y) -> torch.Tensor:
        """Label values (a Series, list or array of the label column) to class indices ``[N]``."""
        if self.classes is None:
            raise InputError("the schema has no label classes; build it with from_frame(df, label=...)")
        index = {_key(c): i for i, c in enumerate(self.classes)}
        values = list(y.tolist() if hasattr(y, "tolist") else y)
        codes = [index.get(_key(v), -1) for v in values]
        if min(codes, default=0) < 0:
            bad = sorted({str(v) for v, c in zip(values, codes) if c < 0})
            raise InputError(f"labels {bad[:5]} are not among the schema's classes {self.classes}")
        return torch.tensor(codes, dtype=torch.long)

    def preprocess(self):
        """The standardisation a network wants, as a Classifier ``preprocess``: ``(x - mean) / std``
        on numeric columns, one-hot columns unchanged (a :class:`~counterlens.model.Normalize`)."""
        from ..model import Normalize
        return Normalize(self.vector("mean", 0.0).tolist(), self.vector("std", 1.0).tolist())

    def classifier(self, module, device="auto"):
        """``Classifier(module, preprocess=self.preprocess(), classes=self.classes)``: takes schema-space rows."""
        from ..model import Classifier
        classes = [str(c) for c in self.classes] if self.classes is not None else None
        return Classifier(module, preprocess=self.preprocess(), classes=classes, device=device)
