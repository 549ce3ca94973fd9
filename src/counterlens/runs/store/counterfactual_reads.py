"""The counterfactual part of a run as :class:`~counterlens.runs.store.reader.Run` reads it: the
counterfactual rows and images, the region each search could edit, and each case's layer
activation change between original and counterfactual (the ``activations`` table; a run written
before it existed has none, and says so).
"""
from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import pandas as pd

from ...errors import InputError


class CounterfactualReads:
    """Mixed into :class:`~counterlens.runs.store.reader.Run`: it needs the run's ``root``,
    ``table``, ``_case_id``, ``_case_locations`` and ``_npz`` / ``_array``."""

    @cached_property
    def counterfactuals(self) -> pd.DataFrame | None:
        cf = self.table("counterfactuals")
        if not len(cf):
            return None
        out = cf.drop(columns=["array_file", "array_group", "array_row", "written", "shard"]).rename(
            columns={"case_id": "path"})
        out["valid"] = out["valid"].astype(bool)
        for col in ("probs_before", "probs_after"):
            out[col] = [json.loads(v) if isinstance(v, str) else None for v in out[col]]
        return out.reset_index(drop=True)

    @property
    def tabular_counterfactuals(self) -> pd.DataFrame | None:
        t = self.table("tabular_counterfactuals")
        if not len(t):
            return None
        return pd.DataFrame([json.loads(r) for r in t.sort_values(["row_index", "rank"])["record"]])

    def _counterfactual_at(self, path: str, target) -> tuple[str, str, int]:
        """``(file, group, row)`` of case ``path``'s counterfactual (the first target when None)."""
        cid = self._case_id(path)
        for t, file, group, row in self._case_locations()["counterfactuals"].get(cid, ()):
            if target is None or t == int(target):
                return file, group, row
        raise InputError(f"case {cid!r} has no counterfactual{'' if target is None else f' for target {target}'} "
                         f"in {self.root}")

    def counterfactual(self, path: str, target: int | None = None) -> np.ndarray:
        """The counterfactual image of case ``path`` (float32 ``[C, *S]``; the first target when None)."""
        file, group, row = self._counterfactual_at(path, target)
        return self._array(file, f"{group}/counterfactual")[row]

    def editable_mask(self, path: str, target: int | None = None) -> np.ndarray | None:
        """The region the counterfactual search of case ``path`` could change (bool ``[*S]``;
        ``--editable-masks``), or None when it could change the whole image. The case's own
        :meth:`mask` stays its ground truth."""
        file, group, row = self._counterfactual_at(path, target)
        arrays = self._npz(file)
        return arrays[f"{group}/editable"][row] if f"{group}/editable" in arrays else None

    def activation_changes(self, path: str, target: int | None = None) -> list[dict]:
        """How far each layer's output moved between case ``path``'s original and its counterfactual
        (the first target when None), as the counterfactual run recorded it: one dict per layer in
        execution order::

            name, module (class name), shape (output shape per image),
            relative_change   ||a_cf - a|| / ||a|| of this case's layer output (inf if ||a|| = 0 < ||a_cf - a||),
            mean_abs_change   mean |a_cf - a| over the output's elements,
            top_channels      [[channel, mean |change|], ...] largest first ([] for a flat output)

        The numbers of :func:`counterlens.counterfactual.analysis.activation_changes` on this one
        case, for the layers :func:`~counterlens.counterfactual.analysis.summary_layers` picks
        (:meth:`activation_record` says which). Raises :class:`InputError` with the reason when the
        run recorded none for this case (the model's layers could not be observed, or the run was
        written by a counterlens version without them)."""
        record = self.activation_record(path, target)
        if record is None:
            raise InputError(f"case {self._case_id(path)!r} has no layer activation change in {self.root}: the run was "
                             "written before counterlens recorded them; run `counterlens counterfactual` again with "
                             "--overwrite to record them")
        if record["skipped"]:
            raise InputError(f"case {self._case_id(path)!r} has no layer activation change: {record['skipped']}")
        return record["layers"]

    def activation_record(self, path: str, target: int | None = None) -> dict | None:
        """``{"layers": [...], "selection": which layers, "skipped": why none, or None}`` of case
        ``path``'s counterfactual (see :meth:`activation_changes`); None when the run has none for it."""
        cid = self._case_id(path)
        self._counterfactual_at(cid, target)                  # a clear error for a case without a counterfactual
        found = self._activations().get(cid, {})
        key = next(iter(found), None) if target is None else int(target)
        if key not in found:
            return None
        layers, selection, skipped = found[key]
        return {"layers": json.loads(layers) if isinstance(layers, str) else [],
                "selection": selection if isinstance(selection, str) else "",
                "skipped": skipped if isinstance(skipped, str) else None}

    def _activations(self) -> dict:
        """``{case: {target: (layers JSON, selection, skipped)}}`` of the current snapshot."""
        table = self.table("activations")
        cached = self.__dict__.get("_activation_rows")
        if cached is not None and cached[0] is table:
            return cached[1]
        out: dict = {}
        for cid, target, layers, selection, skipped in zip(table["case_id"].astype(str), table["target"],
                                                           table["layers"], table["selection"], table["skipped"]):
            out.setdefault(cid, {})[int(target)] = (layers, selection, skipped)
        self.__dict__["_activation_rows"] = (table, out)
        return out

    def counterfactual_cases(self) -> set[str]:
        cf = self.table("counterfactuals")
        return set(cf["case_id"].astype(str))
