"""The result of a tabular counterfactual search, its DataFrame views, and recourse per group."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from ..data.tabular import TabularSchema
from ..errors import InputError
from ..metrics import tabular as tm_metrics
from .tabular_box import Box

PER_CF = ("l0", "l1_mad", "violations", "ynn", "redundancy")


@dataclass
class TabularCounterfactualResult:
    """Counterfactuals of ``B`` queries, ``k`` slots each (CPU tensors, schema space).

    Fields
    ------
    schema : the schema with this call's constraints (what ``violations`` is checked against).
    x_orig : ``[B, D]`` the queries; ``frame_orig``: them as a DataFrame (as given).
    x : ``[B, k, D]`` counterfactuals; a slot without one holds the query itself.
    present : ``[B, k]`` bool, a counterfactual is in the slot (the search returns only valid,
        distinct ones, cheapest first); ``valid`` re-checks each slot's prediction.
    target : ``[B, k]`` class each counterfactual reaches (for ``"other"``) or aims at.
    probs_before : ``[B, K]``; ``probs_after``: ``[B, k, K]``.
    l0, l1_mad, violations, ynn, redundancy : ``[B, k]`` per counterfactual (NaN in empty slots;
        ``ynn`` NaN without enough reference rows); see :mod:`counterlens.metrics.tabular`.
    diversity, count_diversity : ``[B]`` of each query's set.
    already : ``[B]`` bool, the model already gives the target: nothing to change.
    reason : ``B`` strings, ``""`` when a counterfactual was found.
    """

    schema: TabularSchema
    x_orig: Tensor
    frame_orig: pd.DataFrame
    x: Tensor
    present: Tensor
    valid: Tensor
    target: Tensor
    probs_before: Tensor
    probs_after: Tensor
    l0: Tensor
    l1_mad: Tensor
    violations: Tensor
    ynn: Tensor
    redundancy: Tensor
    diversity: Tensor
    count_diversity: Tensor
    already: Tensor
    reason: list[str]
    classes: list[str]
    params: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def found(self) -> Tensor:
        """``[B]`` bool: at least one counterfactual."""
        return self.present.any(dim=1)

    @property
    def pred_before(self) -> Tensor:
        return self.probs_before.argmax(dim=1)

    def cheapest(self, cost: str = "l1_mad") -> Tensor:
        """``[B]`` the smallest ``cost`` (``"l1_mad"`` or ``"l0"``) of each query's counterfactuals (NaN: none)."""
        values = getattr(self, cost).masked_fill(~self.present, math.inf).amin(dim=1)
        return torch.where(torch.isfinite(values), values, math.nan)

    def counterfactuals(self, i: int) -> pd.DataFrame:
        """Query ``i``'s counterfactuals as full rows of raw features (unchanged values copied exactly)."""
        n = int(self.present[i].sum())
        x = self.x[i, :n]
        decoded = self.schema.decode(x) if n else pd.DataFrame(columns=self.schema.names)
        changed = tm_metrics.changed_features(self.schema, x, self.x_orig[i:i + 1]) if n else None
        orig = self.frame_orig.iloc[i]
        rows = []
        for r in range(n):
            rows.append({f.name: (_exact(f, decoded.iloc[r][f.name]) if bool(changed[r, j]) else orig[f.name])
                         for j, f in enumerate(self.schema.features)})
        return pd.DataFrame(rows, columns=self.schema.names)

    def frame(self, i: int, *, blank_unchanged: bool = True) -> pd.DataFrame:
        """Query ``i`` and its counterfactuals, only the features that some counterfactual changes,
        with the goal probability, ``l0`` and ``l1_mad``; unchanged cells shown as ``"-"``."""
        if not 0 <= i < len(self):
            raise InputError(f"query {i} does not exist; the result has {len(self)} queries")
        cfs = self.counterfactuals(i)
        n = len(cfs)
        changed = tm_metrics.changed_features(self.schema, self.x[i, :n], self.x_orig[i:i + 1]) if n else \
            torch.zeros(0, len(self.schema), dtype=torch.bool)
        cols = [f.name for j, f in enumerate(self.schema.features) if bool(changed[:, j].any())]
        table = pd.concat([self.frame_orig.iloc[[i]][cols], cfs[cols]], ignore_index=True)
        if blank_unchanged and n:
            table = table.astype(object)
            for j, name in enumerate(cols):
                col = self.schema.names.index(name)
                table.loc[1:, name] = [v if bool(changed[r, col]) else "-"
                                       for r, v in enumerate(table[name].iloc[1:].tolist())]
        t = int(self.target[i, 0])
        table.insert(len(cols), f"p({self.classes[t]})",
                     [float(self.probs_before[i, t])] + self.probs_after[i, :n].gather(
                         1, self.target[i, :n, None]).squeeze(1).tolist())
        table.insert(len(cols) + 1, "l0", [0.0] + self.l0[i, :n].tolist())
        table.insert(len(cols) + 2, "l1_mad", [0.0] + self.l1_mad[i, :n].tolist())
        table.index = ["original"] + [f"cf {r + 1}" for r in range(n)]
        return table

    def frames(self) -> list[pd.DataFrame]:
        return [self.frame(i) for i in range(len(self))]

    def to_frame(self) -> pd.DataFrame:
        """Every counterfactual as one row: ``query``, ``rank``, the raw features, the goal class and
        its probability, ``valid`` and the per-counterfactual metrics."""
        parts = []
        for i in range(len(self)):
            cfs = self.counterfactuals(i)
            if not len(cfs):
                continue
            n = len(cfs)
            t = self.target[i, :n]
            meta = pd.DataFrame({"query": i, "rank": range(n)})
            info = pd.DataFrame({
                "target": t.tolist(), "target_name": [self.classes[c] for c in t.tolist()],
                "prob_target": self.probs_after[i, :n].gather(1, t[:, None]).squeeze(1).tolist(),
                "valid": self.valid[i, :n].tolist(), **{m: getattr(self, m)[i, :n].tolist() for m in PER_CF}})
            parts.append(pd.concat([meta, cfs, info], axis=1))
        if not parts:
            return pd.DataFrame(columns=["query", "rank", *self.schema.names, "target", "target_name", "prob_target",
                                         "valid", *PER_CF])
        return pd.concat(parts, ignore_index=True)

    def summary(self) -> list[dict]:
        """One plain dict per query (for tables, JSON or SQLite)."""
        out = []
        best = self.cheapest()
        for i in range(len(self)):
            pred = int(self.pred_before[i])
            out.append({"query": i, "pred_before": pred, "pred_before_name": self.classes[pred],
                        "n_found": int(self.present[i].sum()), "already": bool(self.already[i]),
                        "cheapest_l1_mad": float(best[i]), "diversity": float(self.diversity[i]),
                        "reason": self.reason[i]})
        return out

    def metrics(self) -> dict[str, float]:
        """Means over the returned counterfactuals, and shares over the queries searched."""
        searched = ~self.already
        p = self.present
        mean = (lambda t: float(t[p].double().nanmean())) if bool(p.any()) else (lambda t: math.nan)
        many = p.sum(dim=1) >= 2
        return {"queries": int(searched.sum()),
                "found": float(self.found[searched].double().mean()) if bool(searched.any()) else math.nan,
                "per_query": float(p[searched].sum(dim=1).double().mean()) if bool(searched.any()) else math.nan,
                "valid": mean(self.valid), **{m: mean(getattr(self, m)) for m in PER_CF},
                "diversity": float(self.diversity[many].mean()) if bool(many.any()) else math.nan,
                "count_diversity": float(self.count_diversity[many].mean()) if bool(many.any()) else math.nan}

    def __repr__(self) -> str:
        return (f"TabularCounterfactualResult({len(self)} queries, {int(self.found.sum())} with a counterfactual, "
                f"{int(self.present.sum())} counterfactuals)")


def _exact(f, value):
    """A changed value as returned: numeric ones inside the permitted range in float64 (the search
    runs in float32, whose nearest value to a bound can lie a hair outside it)."""
    if not f.numeric:
        return value
    return type(value)(min(max(value, f.low), f.high))


def recourse_by_group(result: TabularCounterfactualResult, groups, *, cost: str = "l1_mad") -> pd.DataFrame:
    """Per group of the queries: how many were searched, the share with a counterfactual, and the mean
    and median ``cost`` of the cheapest one (over those found).

    ``groups``: a feature name of the result's queries (e.g. a protected attribute), or one label per query.
    """
    if isinstance(groups, str):
        if groups not in result.frame_orig.columns:
            raise InputError(f"groups={groups!r} is not a feature; pass one of {result.schema.names} "
                             "or one group label per query")
        labels = result.frame_orig[groups].tolist()
    else:
        labels = list(groups)
    if len(labels) != len(result):
        raise InputError(f"{len(labels)} group labels for {len(result)} queries; pass one per query")
    best = result.cheapest(cost).numpy()
    frame = pd.DataFrame({"group": labels, "searched": (~result.already).numpy(), "found": result.found.numpy(),
                          "cost": best})
    frame = frame[frame["searched"]]
    rows = []
    for g, part in frame.groupby("group", sort=True):
        hit = part[part["found"]]
        rows.append({"group": g, "queries": len(part), "flippable": float(part["found"].mean()),
                     f"mean_{cost}": float(hit["cost"].mean()) if len(hit) else math.nan,
                     f"median_{cost}": float(hit["cost"].median()) if len(hit) else math.nan})
    return pd.DataFrame(rows)


def assemble(schema, model, goal, x0, frame, out_x, present, probs0, probs_after, already, names, ref, ref_class,
             params, seconds) -> TabularCounterfactualResult:
    """Check and measure every returned counterfactual; build the result on the CPU."""
    b, k, d = out_x.shape
    rows_goal = goal.rows(torch.arange(b, device=x0.device).repeat_interleave(k))
    flat = out_x.reshape(b * k, d)
    valid, cls, _ = rows_goal.check(probs_after.reshape(b * k, -1), eps=0.0)
    cpu = lambda t: t.detach().cpu()
    valid, cls, keep = cpu(valid).view(b, k) & cpu(present), cpu(cls).view(b, k), cpu(present).flatten()
    x_cf, x_q = cpu(flat).double(), cpu(x0).double().repeat_interleave(k, dim=0)
    nan = torch.full((b * k,), math.nan, dtype=torch.float64)
    metric = {m: nan.clone() for m in PER_CF}
    if bool(keep.any()):
        a, q = x_cf[keep], x_q[keep]
        metric["l0"][keep] = tm_metrics.l0(schema, a, q)
        metric["l1_mad"][keep] = tm_metrics.l1_mad(schema, a, q)
        metric["violations"][keep] = tm_metrics.violations(schema, a, q).double()
        if ref_class is not None:
            metric["ynn"][keep] = tm_metrics.ynn(schema, a, cls.flatten()[keep], cpu(ref), cpu(ref_class))
        fixed = rows_goal.target.cpu()[keep] >= 0
        metric["redundancy"][keep] = tm_metrics.redundancy(
            lambda r: model.probs(r.to(x0.device)).cpu(), schema, a, q, torch.where(fixed, cls.flatten()[keep], -1),
            orig=rows_goal.orig.cpu()[keep], threshold=goal.threshold).double()
    sets = [x_cf.view(b, k, d)[i][cpu(present)[i]] for i in range(b)]
    div = tm_metrics.diversity(schema, sets)
    frame = frame if frame is not None else schema.decode(cpu(x0))
    reasons = []
    movable = Box.build(schema, cpu(x0)).movable.any(dim=1)
    for i in range(b):
        t = int(goal.target[i])
        goal_text = f"any class but {names[int(goal.orig[i])]!r}" if t < 0 else repr(names[t])
        if bool(present[i].any()):
            reasons.append("")
        elif bool(already[i]):
            reasons.append(f"the model already gives {goal_text}; nothing to change")
        elif not bool(movable[i]):
            reasons.append("no feature may change under the constraints (immutable, monotone, ranges)")
        else:
            reasons.append(f"no counterfactual reaching {goal_text} with probability >= {goal.threshold:g} "
                           "was found within the constraints")
    shape = lambda t: t.view(b, k)
    return TabularCounterfactualResult(
        schema=schema, x_orig=cpu(x0), frame_orig=frame.reset_index(drop=True), x=cpu(out_x), present=cpu(present),
        valid=valid, target=cls, probs_before=cpu(probs0), probs_after=cpu(probs_after),
        **{m: shape(metric[m]) for m in PER_CF}, diversity=div["l1_mad"], count_diversity=div["count"],
        already=cpu(already), reason=reasons, classes=list(names), params=params, seconds=seconds)
