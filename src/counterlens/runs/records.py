"""The plain data that flows between the pipeline stages, the engines and the store.

Everything here is a small dataclass of numbers, strings and numpy arrays, so a stage can run in
another process (or on another machine) and hand its result back by pickling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np


def text_of(value) -> str | None:
    """A path or message as text that SQLite, JSON, HTML and any terminal take: bytes of a file
    name that are not UTF-8 are written as ``\\xNN`` (``caf\\xe9.png``)."""
    if value is None:
        return None
    return os.fsencode(str(value)).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Case:
    """One item of work: a file, and what is known about it before reading it."""

    id: str                      #: path relative to the data root, e.g. ``glioma/x.png``: the case's identity
    file: str                    #: the file to read
    label: int | None = None
    label_name: str | None = None
    mask_file: str | None = None
    findings: tuple[int, ...] | None = None     #: multi-label: 1, 0 or -1 (unknown) per finding
    finding_masks: tuple[str | None, ...] | None = None   #: multi-label: a mask file per finding (None: none)


@dataclass
class ReadBatch:
    """What :func:`~counterlens.runs.pipeline.read_batch` gives: the cases that loaded (one image
    each, data space ``[C, *S]`` float32) and those that did not, with the reason."""

    cases: list[Case]
    images: list[np.ndarray]
    masks: list[np.ndarray | None]                #: ``[*S]``, or ``[K, *S]`` with a mask per finding
    failed: list[tuple[Case, str]] = field(default_factory=list)


@dataclass
class CaseResult:
    """Everything a run records for one case: prediction, maps, counterfactual, or the failure."""

    case: Case
    status: str = "done"                          #: "done" or "failed"
    error: str | None = None
    prediction: int | None = None
    prediction_name: str | None = None
    probs: list[float] | None = None
    image: np.ndarray | None = None               #: ``[C, *S]`` float32, data space
    mask: np.ndarray | None = None                #: ``[*S]`` bool
    maps: dict[str, np.ndarray] = field(default_factory=dict)       #: ``{method: [*S] float32}`` (``[T, *S]``: see targets)
    targets: dict[str, int | list[int]] = field(default_factory=dict)   #: class each map explains (a list: one map each)
    explained: list[int] | None = None            #: multi-label ``all-positive``: the findings explained (maybe none)
    seconds: dict[str, float] = field(default_factory=dict)         #: method time per image
    counterfactual: dict | None = None            #: row fields and ``x`` (``[C, *S]``)
    skipped: dict[str, str] = field(default_factory=dict)           #: method -> why it could not run here

    def map_items(self):
        """``(method, target, map [*S])`` for every map of the case (several per method with a list of targets)."""
        for method, arr in self.maps.items():
            t = self.targets[method]
            if isinstance(t, (list, tuple)):
                yield from ((method, int(tk), arr[k]) for k, tk in enumerate(t))
            else:
                yield method, int(t), arr

    @classmethod
    def failure(cls, case: Case, error: str) -> "CaseResult":
        return cls(case=case, status="failed", error=str(error))
