"""The per-finding columns of a multi-label run's cases (read by :class:`~counterlens.runs.store.reader.Run`)."""
from __future__ import annotations

import json

import pandas as pd


def finding_columns(df: pd.DataFrame, raw: pd.DataFrame, probs: list, names: list[str], threshold: float) -> None:
    """A multi-label run's cases: ``label`` / ``prediction`` as the positive findings' names
    (``"opacity, effusion"``, ``"none"``; label None when unknown), ``label_<finding>`` (1 / 0, NA
    unknown) and ``pred_<finding>`` (probability at least ``threshold``) per finding."""
    labels = [json.loads(v) if isinstance(v, str) else None for v in raw["labels"]]

    def names_of(flags):
        return ", ".join(n for n, f in zip(names, flags) if f) or "none"

    known = [v is not None and all(x >= 0 for x in v) for v in labels]
    df["label"] = [names_of([x > 0 for x in v]) if ok else None for v, ok in zip(labels, known)]
    positive = [[p_ >= threshold for p_ in p] if p else None for p in probs]
    df["prediction"] = [names_of(f) if f is not None else None for f in positive]
    for i, name in enumerate(names):
        df[f"label_{name}"] = pd.array([v[i] if v is not None and i < len(v) and v[i] >= 0 else None for v in labels],
                                       dtype="Int64")
        df[f"pred_{name}"] = pd.array([int(f[i]) if f is not None and i < len(f) else None for f in positive],
                                      dtype="Int64")
