"""Tabular counterfactuals: which change to a row's features flips the model's decision.

``tabular_counterfactual(model, X, target="other", schema=schema, k=4)`` returns up to ``k``
diverse, sparse, close counterfactuals per row of ``X``, none of which breaks the schema's
constraints (ranges, categories, integers, immutable and monotone features).

The model is either

- a :class:`~counterlens.model.Classifier` that takes *schema-space* rows ``[N, D]`` (numeric
  features in raw units, categoricals one-hot, in the schema's order; ``schema.classifier(net)``
  builds one with the standardisation as its preprocess): searched with gradients
  (``method="gradient"``, the default for it); or
- a black box: an object with ``predict_proba`` (e.g. a scikit-learn estimator or pipeline) or a
  callable ``predict_proba(rows) -> [N, K]``, fed DataFrames of raw features (``model_input=
  "frame"``) or schema-space arrays (``"array"``): searched by a batched genetic search
  (``method="genetic"``).

Both searches are followed by the same refinement (:mod:`.tabular_refine`): hard projection and
repair, a sparsity pass that reverts every change not needed, bisection of numeric changes towards
the original, and the choice of ``k`` distinct counterfactuals per query: the cheapest first, then
alternatives that are far from those already chosen (``diversity``).

With ``plausibility=p`` and ``reference`` rows (the training table), a counterfactual must also
sit among rows of its class: at least ``p`` of its ``n_neighbors`` nearest reference rows are put
in the goal class by the model (what yNN measures). Search points that are valid but not plausible
are pushed further along their own edit; more candidates start from the nearest reference rows of
the goal class (projected onto the constraints). The refinement then only reverts or shrinks a
change while the row stays valid *and* plausible, so these counterfactuals are larger than the
minimal ones, and data-supported. Rows that cannot be made plausible are returned after the
plausible ones (their ``ynn`` says so).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import time

import numpy as np
import pandas as pd
import torch

from ..data.tabular import TabularSchema
from ..errors import InputError, MethodError, TargetError
from ..model import Classifier
from .constraints import check_number
from .tabular_box import Box
from .tabular_plausible import Neighbours, reach, seeds
from .tabular_refine import repair, select, shrink, sparsify
from .tabular_result import TabularCounterfactualResult, assemble, recourse_by_group
from .tabular_search import Goal, Sampler, genetic_search, gradient_search, uniform

__all__ = ["TabularModel", "recourse_fairness", "tabular_counterfactual"]

K_MAX = 100      # counterfactuals per query: the candidate pool grows with k (k=100000 would need terabytes)
EXCLUDE = 0.8    # gradient rows beyond the first k: each feature barred with this probability (one always stays)


class TabularModel:
    """A Classifier or a black-box ``predict_proba`` as ``probs(rows [N, D]) -> [N, K]`` in chunks."""

    def __init__(self, model, schema: TabularSchema, batch_size: int = 8192, model_input: str = "auto"):
        self.schema, self.batch_size = schema, int(batch_size)
        self.clf = model if isinstance(model, Classifier) else None
        if self.clf is not None:
            self.device, self.fn, self.input = self.clf.device, None, "array"
            return
        fn = getattr(model, "predict_proba", None)
        fn = fn if callable(fn) else (model if callable(model) else None)
        if fn is None:
            raise InputError(f"model is a {type(model).__name__}; pass a counterlens Classifier (schema-space rows), "
                             "an estimator with predict_proba, or a callable predict_proba(rows) -> [N, K]")
        if model_input not in ("auto", "frame", "array"):
            raise InputError(f"model_input={model_input!r}; pass 'frame' (DataFrame of raw features), 'array' "
                             "(schema-space numbers) or 'auto'")
        if model_input == "auto":
            owner = getattr(fn, "__self__", model)
            categorical = any(not f.numeric for f in schema.features)
            model_input = "frame" if (hasattr(owner, "feature_names_in_") or categorical) else "array"
        self.device, self.fn, self.input = torch.device("cpu"), fn, model_input
        self.classes = [str(c) for c in getattr(getattr(fn, "__self__", model), "classes_", [])] or None

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self._probs(x[a:a + self.batch_size]) for a in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, 2)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.clf is not None:
            try:
                return torch.softmax(self.clf.forward(x), dim=1)
            except (RuntimeError, AssertionError) as exc:    # a width mismatch (exported programs: "Guard failed")
                raise InputError(f"the model cannot take the table's rows: they have {x.shape[1]} columns after "
                                 f"encoding ({', '.join(f.name for f in self.schema.features)}; categoricals one-hot), "
                                 f"and the model said: {str(exc).splitlines()[0]}. Pass the table and --label the "
                                 "model was trained with") from exc
        rows = self.schema.decode(x, tidy=False) if self.input == "frame" else x.detach().cpu().double().numpy()
        try:
            p = np.asarray(self.fn(rows), dtype=np.float64)
        except Exception as exc:   # the user's model: say what it was fed
            raise MethodError(f"predict_proba failed on {self.input} input of shape {tuple(x.shape)}: {exc}; "
                              "set model_input='frame' or 'array' to match what the model was fit on") from exc
        if p.ndim == 1:
            p = np.stack([1 - p, p], axis=1)
        if p.ndim != 2 or p.shape[0] != x.shape[0] or p.shape[1] < 2 or not np.isfinite(p).all():
            raise MethodError(f"predict_proba returned shape {p.shape} for {x.shape[0]} rows; it must return "
                              "finite probabilities [N, n_classes]")
        return torch.from_numpy(p).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.forward(x)

    def class_names(self, n: int) -> list[str]:
        if self.clf is not None and self.clf.classes is not None:
            return self.clf.class_names(n)
        names = getattr(self, "classes", None)
        if names and len(names) == n:
            return names
        if self.schema.classes and len(self.schema.classes) == n:
            return [str(c) for c in self.schema.classes]
        return [str(i) for i in range(n)]


def tabular_counterfactual(model, X, target="other", *, schema: TabularSchema, k: int = 4, method: str = "auto",
                           threshold: float = 0.5, vary=None, immutable=(), monotone=None, ranges=None,
                           oversample: int = 8, steps: int = 100, step: float = 0.1, growth: float = 1.1,
                           focus: float = 1.0, population: int = 64, generations: int = 40, l0_weight: float = 2.0,
                           diversity: float = 0.8, plausibility: float = 0.0, n_seeds: int = 16, sparse: bool = True,
                           reference=None, n_neighbors: int = 5, model_input: str = "auto",
                           batch_size: int = 8192, seed: int = 0) -> TabularCounterfactualResult:
    """Up to ``k`` counterfactuals per row of ``X``.

    Parameters
    ----------
    model : Classifier on schema-space rows (gradient search), or an estimator with ``predict_proba``
        / a callable ``predict_proba`` (genetic search); see the module docstring.
    X : DataFrame of raw features (extra columns such as the label are ignored), or schema-space
        rows ``[B, D]``.
    target : ``"other"`` (any class but the current prediction), a class index or name, or one per row.
    schema : the table's :class:`~counterlens.data.tabular.TabularSchema`.
    k : 4. Counterfactuals per query (fewer when fewer distinct valid ones are found).
    method : ``"auto"`` (gradient for a Classifier, else genetic), ``"gradient"`` or ``"genetic"``.
    threshold : 0.5. Probability the goal class must reach, strictly above every other class.
    vary, immutable, monotone, ranges : constraints of this call on top of the schema's (only
        ``vary`` may change; ``monotone={"age": "increase"}``; ``ranges={"age": (18, 70)}`` or
        ``{"job": [allowed categories]}``); see :meth:`TabularSchema.constrained`.
    oversample : 8. Gradient search rows per query are ``k * oversample`` (candidate 0 plain,
        candidate ``j < k`` barred from the ``j`` most effective features, the rest with random
        feature weights, each feature barred with probability 0.8); the genetic search refines as
        many of its best.
    steps, step, growth, focus : 100, 0.1, 1.1, 1.0. Gradient search: steps at most, first step
        (in MADs), its growth per step, and the share of the best per-cost gain a column needs to move.
    population, generations : 64, 40. Genetic search: individuals per query, generations at most
        (it stops after 8 without improvement).
    l0_weight : 2.0. Cost per changed feature (in MADs) added to the distance when the genetic
        search ranks individuals and when the ``k`` returned counterfactuals are chosen.
    diversity : 0.8. After the cheapest counterfactual, each next one minimises its cost minus
        ``diversity`` times its distance (the same measure) to the nearest one already chosen: 0
        gives the ``k`` cheapest; values near 1 take alternatives that change other features even
        when they cost more (below 1, the cheaper of two equally distinct ones still wins).
    plausibility : 0.0 (off). Share of the ``n_neighbors`` nearest ``reference`` rows (MAD-L1) that
        the model must put in the counterfactual's class; needs ``reference``.
    n_seeds : 16. With ``plausibility``: extra candidates per query started from the nearest
        reference rows of the goal class.
    sparse : True. Run the sparsity pass and the bisection towards the original (False: return the
        search's points as they are, made hard and valid).
    reference : rows (DataFrame or ``[M, D]``, usually the training table) for yNN and
        ``plausibility``; default ``X`` itself (for yNN only).
    n_neighbors : 5. Neighbours for yNN.
    model_input : ``"auto"``, ``"frame"`` or ``"array"``: what a black box is fed.
    batch_size : 8192. Rows per model call (and per gradient-search chunk).
    seed : 0.

    Returns a :class:`TabularCounterfactualResult`; ``result.frame(i)`` shows query ``i`` with its
    counterfactuals and only the changed features.
    """
    t_start = time.perf_counter()
    if not isinstance(schema, TabularSchema):
        raise InputError(f"schema={type(schema).__name__}; pass a counterlens TabularSchema "
                         "(TabularSchema.from_frame(df, label=...))")
    check_number("k", k, low=1, high=K_MAX, integer=True)
    check_number("threshold", threshold, high=1.0, high_open=True)
    check_number("oversample", oversample, low=1, integer=True)
    for name, v in (("steps", steps), ("population", population), ("generations", generations),
                    ("batch_size", batch_size), ("n_neighbors", n_neighbors)):
        check_number(name, v, low=1, integer=True)
    check_number("step", step, low_open=True)
    check_number("growth", growth, low=1.0)
    check_number("focus", focus, high=1.0)
    check_number("l0_weight", l0_weight)
    check_number("diversity", diversity, high=1.0, high_open=True)
    check_number("plausibility", plausibility, high=1.0)
    check_number("n_seeds", n_seeds, low=1, integer=True)
    check_number("seed", seed, integer=True, high=2 ** 32 - 1)
    if population < 4:
        raise InputError(f"population={population}; pass at least 4 individuals per query")
    used = schema.constrained(vary=vary, immutable=immutable, monotone=monotone, ranges=ranges)
    frame = X[schema.names].reset_index(drop=True) if isinstance(X, pd.DataFrame) else None
    x0 = schema.encode(X)
    if x0.shape[0] == 0:
        raise InputError("X has no rows; pass at least one query")
    tm = TabularModel(model, schema, batch_size, model_input)
    if method == "auto":
        method = "gradient" if tm.clf is not None else "genetic"
    if method not in ("gradient", "genetic"):
        raise InputError(f"method={method!r}; pass 'gradient', 'genetic' or 'auto'")
    if method == "gradient" and tm.clf is None:
        raise MethodError("method='gradient' needs a counterlens Classifier (a differentiable torch model); "
                          "a predict_proba black box is searched with method='genetic'")
    x0 = x0.to(tm.device)
    ctx = tm.clf.eval_mode() if tm.clf is not None else contextlib.nullcontext()
    with ctx:
        _probe(tm, x0)
        probs0 = tm.probs(x0)
        names = tm.class_names(probs0.shape[1])
        goal = Goal(_targets(target, names, x0.shape[0]).to(tm.device), probs0.argmax(dim=1), float(threshold))
        ref = x0 if reference is None else schema.encode(reference).to(tm.device, x0.dtype)
        ref_class = tm.probs(ref).argmax(dim=1) if ref.shape[0] >= n_neighbors else None
        box = Box.build(used, x0)
        near = None
        if plausibility > 0:
            if reference is None or ref_class is None:
                raise InputError(f"plausibility={plausibility} needs reference rows (the training table, at least "
                                 f"n_neighbors={n_neighbors} of them): pass reference=")
            near = Neighbours(ref, ref_class, box.unit, n_neighbors, plausibility)
        already = goal.check(probs0, eps=0.0)[0]
        todo = (~already & box.movable.any(dim=1)).nonzero().squeeze(1)
        m = k * oversample if method == "gradient" else min(population, k * oversample)
        out_x = x0[:, None, :].repeat(1, k, 1)
        present = torch.zeros(x0.shape[0], k, dtype=torch.bool, device=tm.device)
        # gradient: a chunk of queries is optimised together (batch_size rows); genetic: every query at
        # once (each generation's rows go to the model batch_size at a time), bounded for memory
        per_chunk = max(1, batch_size // m) if method == "gradient" else max(1, 2 ** 20 // population)
        for a in range(0, todo.numel(), per_chunk):
            q = todo[a:a + per_chunk]
            rows = q.repeat_interleave(m)
            if method == "gradient":
                cand, valid = _gradient_rows(tm, box, goal, q, m, k, steps, step, growth, focus, seed)
                cand, valid = repair(tm.probs, box.rows(rows), goal.rows(rows), cand, valid)
                if sparse:
                    cand = sparsify(tm.probs, box.rows(rows), goal.rows(rows), cand, valid)
            else:
                cand, valid = _genetic_rows(tm, used, box, goal, q, m, population, generations, l0_weight,
                                            sparse, seed)
            if sparse:
                cand = shrink(tm.probs, box.rows(rows), goal.rows(rows), cand, valid)
                cand = sparsify(tm.probs, box.rows(rows), goal.rows(rows), cand, valid)
            prefer, mm = valid, m
            if near is not None:     # the 2k best minimal ones made plausible, plus candidates from real rows
                full = Goal(goal.target, goal.orig, goal.threshold, near)
                mm = min(m, 2 * k)
                pre, valid = select(box.rows(rows), cand.view(q.numel(), m, -1), valid.view(q.numel(), m), mm,
                                    l0_weight, diversity)
                cand = cand.view(q.numel(), m, -1).gather(1, pre[:, :, None].expand(-1, -1, cand.shape[1]))
                rows = q.repeat_interleave(mm)
                cand, prefer = reach(tm.probs, box.rows(rows), full.rows(rows), cand.flatten(0, 1), valid.flatten(),
                                     sparse)
                s_x, s_ok = seeds(tm.probs, box, full, q, n_seeds, sparse)
                cand = torch.cat([cand.view(q.numel(), mm, -1), s_x.view(q.numel(), n_seeds, -1)], 1).flatten(0, 1)
                valid = torch.cat([valid, s_ok.view(q.numel(), n_seeds)], 1).flatten()
                prefer = torch.cat([prefer.view(q.numel(), mm), s_ok.view(q.numel(), n_seeds)], 1).flatten()
                mm += n_seeds
                rows = q.repeat_interleave(mm)
            chosen, here = select(box.rows(rows), cand.view(q.numel(), mm, -1), valid.view(q.numel(), mm), k,
                                  l0_weight, diversity, prefer.view(q.numel(), mm))
            picked = cand.view(q.numel(), mm, -1).gather(1, chosen[:, :, None].expand(-1, -1, cand.shape[1]))
            out_x[q] = torch.where(here[:, :, None], picked, out_x[q])
            present[q] = here
        probs_after = tm.probs(out_x.view(-1, x0.shape[1])).view(x0.shape[0], k, -1)
        params = {"method": method, "k": k, "threshold": float(threshold), "oversample": oversample, "steps": steps,
                  "step": step, "growth": growth, "focus": focus, "population": population,
                  "generations": generations, "l0_weight": l0_weight, "sparse": bool(sparse),
                  "n_neighbors": n_neighbors, "diversity": diversity, "plausibility": plausibility,
                  "n_seeds": n_seeds, "seed": seed, "batch_size": batch_size, "model_input": tm.input}
        return assemble(used, tm, goal, x0, frame, out_x, present, probs0, probs_after, already, names, ref,
                        ref_class, params, time.perf_counter() - t_start)


def recourse_fairness(model, X: pd.DataFrame, protected: str, *, schema: TabularSchema, negative, target="other",
                      cost: str = "l1_mad", **kwargs) -> tuple[pd.DataFrame, TabularCounterfactualResult]:
    """Is recourse equally within reach across groups? For the rows of ``X`` that the model decides
    ``negative`` (a class name or index), per group of the column ``protected``: how many there
    are, the share that some counterfactual flips (``flippable``) and the mean and median ``cost``
    (``"l1_mad"`` or ``"l0"``) of the cheapest one. ``protected`` is kept immutable when the model
    uses it. ``kwargs`` go to :func:`tabular_counterfactual`. Returns ``(table, result)``.
    """
    if not isinstance(X, pd.DataFrame) or protected not in X.columns:
        raise InputError(f"protected={protected!r}: pass a DataFrame X with that column (the group of each row)")
    tm = TabularModel(model, schema, kwargs.get("batch_size", 8192), kwargs.get("model_input", "auto"))
    ctx = tm.clf.eval_mode() if tm.clf is not None else contextlib.nullcontext()
    with ctx:
        probs = tm.probs(schema.encode(X).to(tm.device))
    names = tm.class_names(probs.shape[1])
    neg = int(_targets(negative, names, 1)[0])
    if neg < 0:
        raise TargetError(f"negative={negative!r}: pass the class of the unfavourable decision ({names})")
    rows = (probs.argmax(dim=1) == neg).nonzero().flatten().cpu().numpy()
    if rows.size == 0:
        raise InputError(f"the model decides {names[neg]!r} for none of the {len(X)} rows; nothing to audit")
    immutable = list(kwargs.pop("immutable", ())) + ([protected] if protected in schema.names else [])
    result = tabular_counterfactual(model, X.iloc[rows], target, schema=schema, immutable=immutable, **kwargs)
    return recourse_by_group(result, X[protected].iloc[rows].tolist(), cost=cost), result


# -- the two searches on a chunk of queries -------------------------------------------------------
def _gradient_rows(tm, box, goal, q, m, k, steps, step, growth, focus, seed):
    """``m`` gradient-search rows per query in ``q``: hard points and their validity."""
    rows = q.repeat_interleave(m)
    cand = torch.arange(m, device=q.device).repeat(q.numel())
    rbox, rgoal = box.rows(rows), goal.rows(rows)
    n_f = box.n_features
    weights = torch.ones(rows.numel(), n_f, dtype=box.x0.dtype, device=q.device)
    # candidates 1..k-1: barred from their j most effective features at the start
    with torch.enable_grad():
        xq = box.x0[q].detach().requires_grad_(True)
        loss, _ = goal.rows(q).hinge(tm.forward(xq))
        (g,) = torch.autograd.grad(loss.sum(), xq, allow_unused=True) if loss.requires_grad else (None,)
        if g is None:
            raise MethodError("the model's output does not depend differentiably on its input (no autograd graph); "
                              "search it as a black box with method='genetic'")
    gain = torch.zeros(q.numel(), n_f, dtype=box.x0.dtype, device=q.device)
    gain.index_add_(1, box.col_feat, g.abs() / box.unit)
    gain = torch.where(box.movable[q], gain, -1.0)
    rank = gain.argsort(dim=1, descending=True).argsort(dim=1).repeat_interleave(m, dim=0)
    n_mov = box.movable[rows].sum(dim=1, keepdim=True)
    bar = (rank < cand[:, None]) & (cand[:, None] < k) & (cand[:, None] < n_mov)
    # candidates k..m-1: random feature weights and exclusions (a pure function of seed, query, candidate)
    u = uniform(seed, (rows, cand), 2 * n_f)
    rand = cand[:, None] >= k
    weights = torch.where(rand, torch.exp(2.0 * (u[:, :n_f] - 0.5) * 2.0), weights)
    drop = rand & (u[:, n_f:] < EXCLUDE) & (u[:, n_f:] > u[:, n_f:].masked_fill(~box.movable[rows], 2.0).amin(dim=1,
                                                                                                   keepdim=True))
    weights = torch.where(bar | drop, math.inf, weights)
    x, _ = gradient_search(tm.forward, rbox, rgoal, weights, steps=steps, step=step, growth=growth, focus=focus)
    x = rbox.project(x, hard=True)
    valid = rgoal.check(tm.probs(x))[0]
    return x, valid


def _genetic_rows(tm, schema, box, goal, q, m, population, generations, l0_weight, sparse, seed):
    """``m`` distinct individuals per query in ``q`` from the genetic search's final population (all
    of it made sparse first, so that individuals which reduce to the same change count once)."""
    qbox, qgoal = box.rows(q), goal.rows(q)
    pop, _, valid, _ = genetic_search(tm.probs, qbox, qgoal, Sampler(schema, qbox), q, population=population,
                                      generations=generations, l0_weight=l0_weight, seed=seed)
    b, p, d = pop.shape
    rows = q.repeat_interleave(p)
    flat, valid = pop.reshape(b * p, d), valid.flatten()
    if sparse:
        flat = sparsify(tm.probs, box.rows(rows), goal.rows(rows), flat, valid)
    chosen, here = select(box.rows(rows), flat.view(b, p, d), valid.view(b, p), m, l0_weight)   # new sets first
    pick = flat.view(b, p, d).gather(1, chosen[:, :, None].expand(-1, -1, d))
    return pick.reshape(b * m, d), here.flatten()


# -- helpers --------------------------------------------------------------------------------------
def _probe(tm: TabularModel, x0: torch.Tensor) -> None:
    """One row through the model, with an error that says what shape it takes."""
    try:
        tm.probs(x0[:1])
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"the model does not take schema-space rows [N, {x0.shape[1]}] "
                         f"({', '.join(tm.schema.columns[:5])}...): {exc}. Build it on schema.encode(df) "
                         "(e.g. schema.classifier(net))") from exc


def _targets(target, names: list[str], n: int) -> torch.Tensor:
    """One class index per query, -1 for 'other'."""
    def one(t) -> int:
        if isinstance(t, str):
            if t.lower() == "other":
                return -1
            lowered = {c.lower(): i for i, c in enumerate(names)}
            if t.lower() not in lowered:
                raise TargetError(f"target {t!r} is not a class of this model; classes: {names} (or 'other')")
            return lowered[t.lower()]
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):
            if not 0 <= int(t) < len(names):
                raise TargetError(f"target {t} is out of range: the model has {len(names)} classes ({names})")
            return int(t)
        raise TargetError(f"target {t!r}: pass 'other', a class index or a class name ({names})")

    if isinstance(target, (str, numbers.Integral)):
        return torch.full((n,), one(target), dtype=torch.long)
    items = target.tolist() if hasattr(target, "tolist") else list(target)
    if len(items) != n:
        raise TargetError(f"{len(items)} targets for {n} queries; pass one per row or a single one")
    return torch.tensor([one(t) for t in items], dtype=torch.long)
