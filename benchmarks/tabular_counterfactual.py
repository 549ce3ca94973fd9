"""Tabular counterfactuals: counterlens against DiCE (dice-ml), same models, queries and metrics.

    .venv-bench/bin/python benchmarks/tabular_counterfactual.py             # full: 100 queries x 4
    .venv-bench/bin/python benchmarks/tabular_counterfactual.py --quick     # smoke run (5 queries)
    .venv-bench/bin/python benchmarks/tabular_counterfactual.py --no-dice   # counterlens alone

(DiCE lives in its own venv: ``python3 -m venv .venv-bench && .venv-bench/bin/pip install -c
constraints.txt torch==2.13.0 && .venv-bench/bin/pip install -c constraints.txt -e . dice-ml
scikit-learn``.)

Tasks (everything seeded and generated or loaded offline):

- ``breast-cancer``: sklearn's breast-cancer table (569 x 30, real), an MLP 30-32-2 trained here;
  the first ``--queries`` rows, target "the other class".
- ``credit``: a generated credit-style table (3000 rows: age, income, savings, loan, duration,
  dependents; credit history, employment, housing, purpose, sex), an MLP on its one-hot encoding;
  ``sex`` is immutable (protected) and ``age`` may only increase; queries: the first rows the
  model refuses, target "good".
- ``breast-cancer-forest``: the same table with a scikit-learn random forest (a black box).

Methods: counterlens (gradient search for the MLPs, genetic search for the forest; all queries in
one call) and DiCE's ``random``, ``genetic`` (sklearn backend: the same model behind a
``predict_proba`` on DataFrames) and ``gradient`` (DiCE's PyTorch backend, MLPs only: the same
network behind DiCE's one-hot + min-max input), one ``generate_counterfactuals`` call per query,
``features_to_vary`` = every feature but the immutable ones. DiCE has no monotone constraint.

Metrics, all computed by :mod:`counterlens.metrics.tabular` on the returned DataFrames under the
task's constraints: ``valid`` share of the ``queries x k`` requested counterfactuals that are
returned, distinct and valid (as DiCE's own validity); ``found`` share of queries with at least
one; ``l0`` features changed, ``l1_mad`` MAD-normalised L1 (means over valid counterfactuals,
lower is better); ``diversity`` mean pairwise ``l1_mad`` within a query's set and ``count_div``
mean pairwise share of differing features (over queries with two or more; higher is better);
``ynn`` share of the 5 nearest training rows the model puts in the counterfactual's class
(higher is better); ``redundancy`` changes that could be reverted alone (lower is better);
``violations`` features of any returned counterfactual that break a constraint (must be 0);
``s/query`` seconds per query: counterlens the median of ``--repeats`` runs of the whole batch
divided by the queries, DiCE the mean over its per-query calls (its median in the JSON).
A second counterlens row asks ``--ours-plausibility`` (0.8) with the training table as reference:
every counterfactual must have at least that share of its 5 nearest training rows in its class
(the quantity yNN measures), which makes edits larger and data-supported (``--ours-threshold``
adds a row that asks more probability of the goal class instead).
DiCE's gradient method takes minutes per query at its defaults (up to 5000 Adam steps per set),
so it runs on the first ``--gradient-queries`` queries, next to counterlens scored on the same.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from counterlens.counterfactual.tabular import tabular_counterfactual
from counterlens.data.tabular import TabularSchema
from counterlens.metrics import tabular as M

QUALITY = ("valid", "found", "l0", "l1_mad", "diversity", "count_div", "ynn", "redundancy", "violations")
BETTER = {"valid": "max", "found": "max", "l0": "min", "l1_mad": "min", "diversity": "max", "count_div": "max",
          "ynn": "max", "redundancy": "min", "violations": "min"}


# -- data and models ------------------------------------------------------------------------------
def credit_table(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A credit-style table with a label that depends on income, savings, loan, duration, history,
    employment, housing and (a historical bias) sex."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["female", "male"], n)
    age = rng.integers(19, 71, n)
    employment = rng.choice(["unemployed", "<1y", "1-4y", "4-7y", ">7y"], n, p=[0.08, 0.17, 0.35, 0.2, 0.2])
    income = np.round(rng.lognormal(3.4 + 0.004 * (age - 19) + 0.15 * (employment != "unemployed"), 0.45, n), 1)
    savings = np.round(rng.exponential(4 + 0.1 * (age - 19), n), 1)
    loan = np.round(rng.lognormal(2.3, 0.6, n), 1)
    duration = rng.choice([6, 12, 18, 24, 36, 48, 60], n)
    dependents = rng.integers(0, 4, n)
    history = rng.choice(["all_paid", "existing_paid", "delayed", "critical"], n, p=[0.25, 0.45, 0.15, 0.15])
    housing = rng.choice(["own", "rent", "free"], n, p=[0.55, 0.35, 0.1])
    purpose = rng.choice(["car", "furniture", "education", "business", "other"], n)
    score = (1.2 * np.log(income / 30) + 0.08 * savings - 0.9 * np.log(loan / 10) - 0.025 * (duration - 24)
             - 0.25 * dependents + 0.012 * (age - 40)
             + pd.Series(history).map({"all_paid": 0.8, "existing_paid": 0.3, "delayed": -0.6, "critical": -1.2}).to_numpy()
             + pd.Series(employment).map({"unemployed": -1.0, "<1y": -0.3, "1-4y": 0.0, "4-7y": 0.3, ">7y": 0.5}).to_numpy()
             + pd.Series(housing).map({"own": 0.4, "rent": -0.2, "free": 0.0}).to_numpy()
             - 0.4 * (sex == "female") + rng.normal(0, 0.5, n))
    return pd.DataFrame({"age": age, "sex": sex, "income": income, "savings": savings, "loan_amount": loan,
                         "duration": duration, "dependents": dependents, "credit_history": history,
                         "employment": employment, "housing": housing, "purpose": purpose,
                         "credit": np.where(score > 0, "good", "bad")})


def train_mlp(schema: TabularSchema, df: pd.DataFrame, hidden: int = 32, epochs: int = 300, seed: int = 0):
    x, y = schema.encode(df), schema.encode_labels(df[schema.label])
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(schema.width, hidden), nn.ReLU(), nn.Linear(hidden, len(schema.classes)))
    clf = schema.classifier(net, device="cpu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    pre = schema.preprocess()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(net(pre(x)), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((clf.forward(x).argmax(1) == y).float().mean())
    return clf, acc


class ProbaOnFrames:
    """A counterlens Classifier behind ``predict_proba(DataFrame)`` (DiCE's sklearn backend)."""

    def __init__(self, clf, schema):
        self.clf, self.schema = clf, schema

    def predict_proba(self, frame):
        with torch.no_grad():
            return torch.softmax(self.clf.forward(self.schema.encode(frame[self.schema.names])), 1).numpy()

    def predict(self, frame):
        return self.predict_proba(frame).argmax(1)


class DiceInput(nn.Module):
    """The same network behind DiCE's PyTorch input (one-hot, continuous min-max scaled to [0, 1]),
    returning probabilities as DiCE expects."""

    def __init__(self, clf, schema, data_df, continuous):
        super().__init__()
        self.clf, self.schema, self.data_df, self.continuous = clf, schema, data_df, continuous
        self.names = None

    def forward(self, z):
        one = z.dim() == 1
        z = z[None] if one else z
        if self.names is None:
            dummies = pd.get_dummies(self.data_df[self.schema.names], columns=[f.name for f in self.schema.features
                                                                           if not f.numeric])
            self.names = list(dummies.columns)
        cols = []
        for f in self.schema.features:
            if f.numeric:
                lo, hi = float(self.data_df[f.name].min()), float(self.data_df[f.name].max())
                cols.append(lo + z[:, self.names.index(f.name)] * (hi - lo))
            else:
                cols += [z[:, self.names.index(f"{f.name}_{c}")] for c in f.categories]
        p = torch.softmax(self.clf.forward(torch.stack(cols, dim=1).float()), dim=1)
        return p[0] if one else p


def setup(task: str, n_queries: int, epochs: int = 300):
    """(schema, train frame, model for counterlens, model for DiCE sklearn, torch module for DiCE
    or None, queries, target, constraints, description)."""
    from sklearn.datasets import load_breast_cancer
    if task.startswith("breast-cancer"):
        df = load_breast_cancer(as_frame=True).frame
        schema = TabularSchema.from_frame(df, label="target")
        queries = df[schema.names].iloc[:n_queries].reset_index(drop=True)
        if task == "breast-cancer-forest":
            from sklearn.ensemble import RandomForestClassifier
            forest = RandomForestClassifier(n_estimators=100, max_depth=6, random_state=0).fit(df[schema.names],
                                                                                            df["target"])
            acc = float(forest.score(df[schema.names], df["target"]))
            return {"schema": schema, "df": df, "ours": forest, "dice": forest, "torch": None, "queries": queries,
                    "target": "other", "constraints": {},
                    "about": f"random forest (100 trees, depth 6), train accuracy {acc:.3f}"}
        clf, acc = train_mlp(schema, df, epochs=epochs)
        return {"schema": schema, "df": df, "ours": clf, "dice": ProbaOnFrames(clf, schema),
                "torch": DiceInput(clf, schema, df, schema.names), "queries": queries, "target": "other",
                "constraints": {}, "about": f"MLP 30-32-2, train accuracy {acc:.3f}"}
    df = credit_table()
    schema = TabularSchema.from_frame(df, label="credit")
    clf, acc = train_mlp(schema, df, epochs=epochs)
    refused = torch.softmax(clf.forward(schema.encode(df)), 1).argmax(1).numpy() == schema.classes.index("bad")
    queries = df[schema.names][refused].iloc[:n_queries].reset_index(drop=True)
    return {"schema": schema, "df": df, "ours": clf, "dice": ProbaOnFrames(clf, schema),
            "torch": DiceInput(clf, schema, df, [f.name for f in schema.features if f.numeric]), "queries": queries,
            "target": "good", "constraints": {"immutable": ["sex"], "monotone": {"age": "increase"}},
            "about": f"MLP {schema.width}-32-2 on the one-hot table, train accuracy {acc:.3f}; "
                     "sex immutable, age may only increase"}


# -- scoring --------------------------------------------------------------------------------------
def score(task: dict, sets: list[pd.DataFrame], k: int, probs_fn, target_class) -> dict:
    """Quality of one method's counterfactual sets (one DataFrame per query; None or empty: none)."""
    schema = task["schema"].constrained(**task["constraints"])
    q = task["queries"]
    ref = schema.encode(task["df"])
    ref_class = probs_fn(ref).argmax(1)
    n_valid, viol, found, rows = 0, 0, 0, {m: [] for m in ("l0", "l1_mad", "ynn", "redundancy")}
    div, cdiv, kinds = [], [], {}
    for i, s in enumerate(sets):
        if s is None or len(s) == 0:
            continue
        s = s[schema.names].reset_index(drop=True)
        x = schema.encode(s, strict=False).double()
        x0 = schema.encode(q.iloc[[i]]).double().expand(len(s), -1)
        found_v = M.violations(schema, x, x0, details=True)
        viol += sum(len(d) for d in found_v)
        for d in found_v:
            for why in d.values():
                kinds[_kind(why)] = kinds.get(_kind(why), 0) + 1
        ok_rows = torch.isfinite(x).all(dim=1)
        p0 = probs_fn(x0[:1].float())
        probs = torch.zeros(len(s), p0.shape[1], dtype=torch.float64)
        if ok_rows.any():
            probs[ok_rows] = torch.as_tensor(probs_fn(x[ok_rows].float()), dtype=torch.float64)
        orig = p0.argmax(1).expand(len(s))
        tgt = torch.full((len(s),), -1 if target_class is None else target_class)
        valid = M.is_valid(probs, tgt, orig) & ok_rows & (M.l0(schema, x, x0) > 0)
        # distinct valid ones count
        keep = []
        for r in valid.nonzero().flatten().tolist():
            if all(float((x[r] - x[j]).abs().max()) > 1e-9 for j in keep):
                keep.append(r)
        if not keep:
            continue
        found += 1
        n_valid += len(keep)
        xv, x0v = x[keep], x0[keep]
        cls = probs[keep].argmax(1)
        rows["l0"] += M.l0(schema, xv, x0v).tolist()
        rows["l1_mad"] += M.l1_mad(schema, xv, x0v).tolist()
        rows["ynn"] += M.ynn(schema, xv, cls, ref, ref_class).tolist()
        rows["redundancy"] += M.redundancy(lambda r: probs_fn(r), schema, xv, x0v, tgt[keep], orig=orig[keep]).tolist()
        if len(keep) >= 2:
            d = M.diversity(schema, [xv])
            div.append(float(d["l1_mad"][0]))
            cdiv.append(float(d["count"][0]))
    n = len(sets)
    mean = lambda v: float(np.mean(v)) if v else float("nan")
    return {"valid": n_valid / (n * k), "found": found / n, **{m: mean(v) for m, v in rows.items()},
            "diversity": mean(div), "count_div": mean(cdiv), "violations": viol, "violation_kinds": kinds}


def _kind(reason: str) -> str:
    """A violation reason without its numbers: 'below the permitted minimum', 'immutable but changed', ..."""
    return " ".join(w for w in reason.split() if not any(c.isdigit() for c in w)).strip()


# -- runs -----------------------------------------------------------------------------------------
def run_ours(task: dict, k: int, repeats: int, seed: int, **extra) -> tuple[list, list[float]]:
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = tabular_counterfactual(task["ours"], task["queries"], task["target"], schema=task["schema"], k=k,
                                     seed=seed, **task["constraints"], **extra)
        times.append(time.perf_counter() - t0)
    return [res.counterfactuals(i) for i in range(len(res))], times


def run_dice(task: dict, method: str, k: int, seed: int) -> tuple[list, list[float]]:
    import dice_ml
    schema = task["schema"]
    continuous = [f.name for f in schema.features if f.numeric]
    frame = task["df"]
    if method == "gradient":   # DiCE's PyTorch backend needs a numeric outcome column (class indices)
        frame = frame.assign(**{schema.label: schema.encode_labels(frame[schema.label]).numpy()})
    data = dice_ml.Data(dataframe=frame, continuous_features=continuous, outcome_name=schema.label)
    if method == "gradient":
        model = dice_ml.Model(model=task["torch"], backend="PYT", func="ohe-min-max")
    else:
        model = dice_ml.Model(model=task["dice"], backend="sklearn")
    explainer = dice_ml.Dice(data, model, method=method)
    vary = [n for n in schema.names if n not in task["constraints"].get("immutable", [])]
    desired = "opposite" if task["target"] == "other" else schema.classes.index(task["target"])
    sets, times = [], []
    for i in range(len(task["queries"])):
        q = task["queries"].iloc[[i]]
        extra = {"random_seed": seed} if method == "random" else {}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = explainer.generate_counterfactuals(q, total_CFs=k, desired_class=desired, features_to_vary=vary,
                                                         verbose=False, **extra)
            cfs = out.cf_examples_list[0].final_cfs_df
        except Exception as exc:  # noqa: BLE001  (DiCE raises when it finds nothing for a query)
            cfs = None
            print(f"  dice {method} query {i}: {type(exc).__name__}: {str(exc)[:120]}")
        times.append(time.perf_counter() - t0)
        if method == "gradient":
            print(f"  dice gradient query {i}: {times[-1]:.1f} s, {0 if cfs is None else len(cfs)} rows", flush=True)
        if cfs is not None and schema.label in cfs.columns:
            cfs = cfs.drop(columns=[schema.label])
        sets.append(cfs)
    return sets, times


def probs_of(task):
    model = task["ours"]
    schema = task["schema"]
    if hasattr(model, "forward"):
        return lambda x: torch.softmax(model.forward(torch.as_tensor(x).float()), 1).detach().double()
    return lambda x: torch.as_tensor(model.predict_proba(schema.decode(torch.as_tensor(x).float())), dtype=torch.float64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="breast-cancer,credit,breast-cancer-forest")
    ap.add_argument("--dice-methods", default="random,genetic,gradient")
    ap.add_argument("--gradient-queries", type=int, default=10,
                    help="DiCE gradient runs on the first N queries only (minutes per query at its defaults); "
                         "counterlens is scored on the same N in its own row")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--ours-plausibility", type=float, default=0.8,
                    help="also run counterlens asking this share of each counterfactual's 5 nearest training rows "
                         "to be in its class (0: skip)")
    ap.add_argument("--ours-threshold", type=float, default=0.0,
                    help="also run counterlens asking this probability of the goal class (0: skip)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 queries, 1 repeat, MLPs trained 60 epochs (smoke run)")
    ap.add_argument("--no-dice", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.repeats = 5, 1
    torch.set_num_threads(args.threads)
    results, lines = [], []
    header = ("| task | method | valid | found | l0 | l1_mad | diversity | count_div | ynn | redundancy | violations "
              "| s/query | speed-up (default / plausible) |")
    lines += [header, "|" + "---|" * 13]
    for name in args.tasks.split(","):
        task = setup(name, args.queries, epochs=60 if args.quick else 300)
        target_class = None if task["target"] == "other" else task["schema"].classes.index(task["target"])
        pf = probs_of(task)
        print(f"# {name}: {task['about']}; {len(task['queries'])} queries", flush=True)
        sets_ours, times = run_ours(task, args.k, args.repeats, args.seed)
        ours_s = float(np.median(times)) / len(task["queries"])
        rows = [{"task": name, "method": "counterlens", "s_per_query": ours_s, "s_runs": times,
                 **score(task, sets_ours, args.k, pf, target_class)}]
        if args.ours_plausibility:
            p = args.ours_plausibility
            sets_p, times_p = run_ours(task, args.k, args.repeats, args.seed, plausibility=p, reference=task["df"])
            rows.append({"task": name, "method": f"counterlens (plausibility {p:g})", "s_runs": times_p,
                         "s_per_query": float(np.median(times_p)) / len(task["queries"]),
                         **score(task, sets_p, args.k, pf, target_class)})
        if args.ours_threshold:
            t = args.ours_threshold
            sets_t, times_t = run_ours(task, args.k, args.repeats, args.seed, threshold=t)
            rows.append({"task": name, "method": f"counterlens (threshold {t:g})", "s_runs": times_t,
                         "s_per_query": float(np.median(times_t)) / len(task["queries"]),
                         **score(task, sets_t, args.k, pf, target_class)})
        methods = [] if args.no_dice else [m for m in args.dice_methods.split(",")
                                             if not (m == "gradient" and task["torch"] is None)]
        for method in methods:
            sub = task
            if method == "gradient" and args.gradient_queries < len(task["queries"]):
                n = args.gradient_queries
                sub = {**task, "queries": task["queries"].iloc[:n]}
                rows.append({"task": name, "method": f"counterlens (first {n})", "s_per_query": ours_s,
                             **score(sub, sets_ours[:n], args.k, pf, target_class)})
            sets, times = run_dice(sub, method, args.k, args.seed)
            label = f"dice {method}" + (f" (first {len(sub['queries'])})" if sub is not task else "")
            rows.append({"task": name, "method": label, "s_per_query": float(np.mean(times)),
                         "s_per_query_median": float(np.median(times)), **score(sub, sets, args.k, pf, target_class)})
        plaus_s = next((r["s_per_query"] for r in rows if "plausibility" in r["method"]), None)
        for r in rows:
            dice = r["method"].startswith("dice")
            r["speedup"] = r["s_per_query"] / ours_s if dice else 1.0
            speed = f"{r['speedup']:.0f}x" if dice else ""
            if dice and plaus_s and "first" not in r["method"]:
                r["speedup_plausible"] = r["s_per_query"] / plaus_s
                speed += f" / {r['speedup_plausible']:.0f}x"
            r["about"] = task["about"]
            cells = [f"{r[m]:.3f}" if m != "violations" else str(r[m]) for m in QUALITY]
            line = f"| {name} | {r['method']} | " + " | ".join(cells) + f" | {r['s_per_query']:.4f} | {speed} |"
            lines.append(line)
            print(line, flush=True)
        results += rows
    table = "\n".join(lines)
    print("\n" + table)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": args.threads, "queries": args.queries, "k": args.k, "repeats": args.repeats}
    from importlib import metadata
    for pkg in ("dice-ml", "scikit-learn", "pandas"):
        try:
            meta[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
