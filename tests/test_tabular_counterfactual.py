"""Tabular counterfactuals on real and generated tables, checked against independent references:
the closed form of a linear model, the models' own predictions on the returned DataFrames, and
constraint checks written here on the DataFrames themselves."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import single_thread
from torch import nn

from counterlens.counterfactual.tabular import recourse_fairness, tabular_counterfactual
from counterlens.counterfactual.tabular_result import recourse_by_group
from counterlens.data.tabular import TabularSchema
from counterlens.errors import InputError, MethodError, TargetError
from counterlens.model import Classifier

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def train(schema, df, hidden=32, epochs=200, seed=0):
    x, y = schema.encode(df), schema.encode_labels(df[schema.label])
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(schema.width, hidden), nn.ReLU(), nn.Linear(hidden, len(schema.classes)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    pre = schema.preprocess()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(net(pre(x)), y).backward()
        opt.step()
    return schema.classifier(net, device="cpu")


def predict(clf, schema, frame):
    """The model's probabilities on a DataFrame, computed here (not by the search)."""
    with torch.no_grad():
        return torch.softmax(clf.module(clf.preprocess(schema.encode(frame))), dim=1)


@pytest.fixture(scope="module")
def cancer():
    from sklearn.datasets import load_breast_cancer
    df = load_breast_cancer(as_frame=True).frame
    schema = TabularSchema.from_frame(df, label="target")
    return df, schema, train(schema, df)


def loan_table(n=600, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.integers(20, 65, n), "sex": rng.choice(["f", "m"], n),
                       "income": np.round(rng.uniform(10, 100, n), 1), "plan": rng.choice(["basic", "plus", "premium"], n),
                       "region": rng.choice(["n", "s", "e", "w"], n), "children": rng.integers(0, 4, n)})
    score = (0.05 * (df["income"] - 50) + df["plan"].map({"basic": -1.5, "plus": 0.0, "premium": 1.5})
             + 0.03 * (df["age"] - 40) - 0.3 * df["children"] + rng.normal(0, 0.3, n))
    df["ok"] = np.where(score > 0, "yes", "no")
    return df


@pytest.fixture(scope="module")
def loans():
    df = loan_table()
    schema = TabularSchema.from_frame(df, label="ok")
    return df, schema, train(schema, df, epochs=300)


# -- the closed form of a linear model ------------------------------------------------------------
def linear_case(ranges=None):
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.uniform(0, 10, size=(200, 4)), columns=["a", "b", "c", "d"])
    schema = TabularSchema.from_frame(df, ranges=ranges)
    w = torch.tensor([0.5, -1.0, 0.8, 0.3])
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(4), w]))
        lin.bias.copy_(torch.tensor([0.0, 1.3]))
    clf = Classifier(lin, device="cpu", classes=["no", "yes"])
    x0 = pd.DataFrame([[2.0, 6.0, 1.0, 3.0]], columns=["a", "b", "c", "d"])
    gap = float(-(w @ torch.tensor(x0.iloc[0].to_numpy(), dtype=torch.float32)) - 1.3)    # logit to climb: 2.0
    scale = np.array([schema[n].scale for n in "abcd"])
    return schema, clf, x0, w.numpy(), gap, scale


def test_linear_model_gives_the_closed_form_minimal_changes():
    schema, clf, x0, w, gap, scale = linear_case()
    res = tabular_counterfactual(clf, x0, schema=schema, k=4)
    # one feature alone reaches the boundary at cost gap / (|w_i| * scale_i) (in MADs); the cheapest
    # is the L1-optimal counterfactual, the others the next single-feature ones
    single = gap / (np.abs(w) * scale)
    order = np.argsort(single)
    assert bool(res.present.all()) and bool(res.valid.all())
    for r in range(4):
        changed = (res.x[0, r] - res.x_orig[0]).abs() > 1e-6
        assert changed.nonzero().flatten().tolist() == [int(order[r])]
        assert float(res.l1_mad[0, r]) == pytest.approx(single[order[r]], rel=0.02)
        assert float(res.l1_mad[0, r]) >= single[order[r]] * (1 - 1e-4)     # never below the optimum
    assert int(res.violations.sum()) == 0


def test_linear_model_with_a_binding_range_is_the_fractional_knapsack():
    # the best feature (b, from 6.0) may only go down to 5.0: the rest comes from the next best (c)
    schema, clf, x0, w, gap, scale = linear_case(ranges={"b": (5.0, 10.0)})
    res = tabular_counterfactual(clf, x0, schema=schema, k=1, l0_weight=0.0)     # pure L1: no cost per feature
    eff = np.abs(w) * scale                            # logit per MAD
    assert list(np.argsort(-eff)[:2]) == [1, 2]
    room_b = (6.0 - 5.0) / scale[1]                    # MADs available on b
    expected = room_b + (gap - room_b * eff[1]) / eff[2]
    assert float(res.l1_mad[0, 0]) == pytest.approx(expected, rel=0.02)
    assert float(res.l1_mad[0, 0]) >= expected * (1 - 1e-4)
    assert float(res.x[0, 0, 1]) == pytest.approx(5.0)
    assert int(res.l0[0, 0]) == 2


def test_selection_trades_cost_for_a_distinct_alternative():
    # candidates of one query: a (feature a, cost 1), b (a, plus a little of b: cost 1.3, next to a),
    # c (feature c alone: cost 2.5). Without the diversity term the second pick is the cheaper b;
    # with it, c, which is far from a (the distance to a outweighs the extra cost)
    from counterlens.counterfactual.tabular_box import Box
    from counterlens.counterfactual.tabular_refine import select
    schema, _, x0, _, _, scale = linear_case()
    x0 = schema.encode(x0).double()
    box = Box.build(schema, x0)
    cand = x0.repeat(3, 1)
    cand[0, 0] += 1.0 * scale[0]
    cand[1, 0] += 1.0 * scale[0]
    cand[1, 1] += 0.3 * scale[1]
    cand[2, 2] += 2.5 * scale[2]
    valid = torch.ones(1, 3, dtype=torch.bool)
    plain, _ = select(box, cand[None], valid, 2, l0_weight=0.0, diversity=0.0)
    diverse, _ = select(box, cand[None], valid, 2, l0_weight=0.0, diversity=0.8)
    assert plain[0].tolist() == [0, 1] and diverse[0].tolist() == [0, 2]
    # a near copy (the same feature, 2% further) is not a second answer; the same feature much further is
    near = torch.stack([cand[0], cand[0], cand[0]])
    near[1, 0] += 0.02 * scale[0]
    near[2, 0] += 1.0 * scale[0]
    picked, present = select(box, near[None], valid, 3, l0_weight=0.0, diversity=0.0)
    assert picked[0, :2].tolist() == [0, 2] and present[0].tolist() == [True, True, False]
    # rows outside `prefer` only come after every preferred one
    preferred, _ = select(box, cand[None], valid, 2, diversity=0.0, prefer=torch.tensor([[False, True, True]]))
    assert preferred[0].tolist() == [1, 2]


def test_bulk_revert_reaches_the_same_minimal_edit_with_fewer_model_calls():
    # 30 numeric features all moved; the rule needs only features 3 and 7 (the dearest changes)
    from counterlens.counterfactual.tabular_box import Box
    from counterlens.counterfactual.tabular_refine import sparsify
    from counterlens.counterfactual.tabular_search import Goal
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(300, 30)), columns=[f"f{i}" for i in range(30)])
    schema = TabularSchema.from_frame(df)
    x0 = schema.encode(df.iloc[[0]]).double().repeat(5, 1)          # one original, five different edits
    box = Box.build(schema, x0)
    scale = 1 / box.unit
    move = torch.from_numpy(rng.uniform(0.1, 0.5, size=(5, 30))) * scale
    move[:, [3, 7]] = 2.0 * scale[[3, 7]]
    x = x0 + move
    calls = []

    def probs(rows):     # class 1 when f3 and f7 are both at least 1 MAD above the original
        calls.append(rows.shape[0])
        ok = (((rows - x0[:1]) / scale)[:, [3, 7]] >= 1.0).all(dim=1)
        return torch.stack([(~ok).double(), ok.double()], dim=1)

    goal = Goal(torch.ones(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), 0.5)
    valid = torch.ones(5, dtype=torch.bool)
    plain = sparsify(probs, box, goal, x, valid)
    n_plain, calls[:] = len(calls), []
    bulk = sparsify(probs, box, goal, x, valid, bulk=True)
    n_bulk = len(calls)
    for out in (plain, bulk):
        changed = ((out - x0).abs() > 1e-9).nonzero()[:, 1].view(5, -1)
        assert changed.tolist() == [[3, 7]] * 5
    assert torch.equal(plain, bulk) and n_bulk < n_plain / 2


# -- real data: breast cancer with an MLP ---------------------------------------------------------
@pytest.mark.slow
def test_breast_cancer_mlp_valid_sparse_and_within_constraints(cancer):
    df, schema, clf = cancer
    queries = df[schema.names].iloc[:100]
    dense = tabular_counterfactual(clf, queries, schema=schema, k=4, sparse=False, reference=df)
    res = tabular_counterfactual(clf, queries, schema=schema, k=4, reference=df)
    assert int(res.found.sum()) >= 99
    assert int(res.violations.nan_to_num(0).sum()) == 0 and int(dense.violations.nan_to_num(0).sum()) == 0
    # independent re-check on the returned DataFrames: the model's other class, inside the data ranges
    table = res.to_frame()
    p = predict(clf, schema, table[schema.names])
    before = predict(clf, schema, queries).argmax(dim=1)
    after = p.argmax(dim=1)
    assert bool((after != before[torch.tensor(table["query"].to_numpy())]).all())
    assert bool((p.max(dim=1).values > 0.5).all())
    lo, hi = df[schema.names].min(), df[schema.names].max()
    assert bool(((table[schema.names] >= lo - 1e-6) & (table[schema.names] <= hi + 1e-6)).all().all())
    # the sparsity pass changes fewer features, and leaves no change that is not needed
    assert res.metrics()["l0"] < dense.metrics()["l0"]
    assert int(res.redundancy.nan_to_num(0).sum()) == 0
    assert res.metrics()["l1_mad"] <= dense.metrics()["l1_mad"]
    # k distinct counterfactuals for most queries
    assert res.metrics()["per_query"] >= 3.5
    view = res.frame(0)
    assert view.index[0] == "original" and set(view.columns[:-3]) <= set(schema.names)
    changed_somewhere = [c for c in view.columns[:-3]]
    assert len(changed_somewhere) < len(schema.names)


@pytest.mark.slow
def test_plausible_counterfactuals_sit_among_rows_of_their_class(cancer):
    from counterlens.metrics.tabular import ynn
    df, schema, clf = cancer
    queries = df[schema.names].iloc[:40]
    ref_class = predict(clf, schema, df[schema.names]).argmax(dim=1)

    def neighbours(res):     # yNN computed here from the returned DataFrame and the model's predictions
        table = res.to_frame()
        cls = predict(clf, schema, table[schema.names]).argmax(dim=1)
        return ynn(schema, table[schema.names], cls, df[schema.names], ref_class, n_neighbors=5)

    plain = tabular_counterfactual(clf, queries, schema=schema, k=4, reference=df)
    res = tabular_counterfactual(clf, queries, schema=schema, k=4, reference=df, plausibility=0.8)
    assert int(res.found.sum()) == len(queries) and bool(res.valid[res.present].all())
    assert int(res.violations.nan_to_num(0).sum()) == 0
    near, before = neighbours(res), neighbours(plain)
    assert float((near >= 0.8 - 1e-9).double().mean()) >= 0.9
    assert float(near.mean()) > float(before.mean()) + 0.4
    # still far sparser than a training row of the other class (which changes every feature)
    assert res.metrics()["l0"] < len(schema.names) / 2
    with pytest.raises(InputError, match="reference"):
        tabular_counterfactual(clf, queries.iloc[:2], schema=schema, plausibility=0.8)


def test_model_left_as_found_and_deterministic(cancer):
    df, schema, clf = cancer
    clf.module.train()
    for p in clf.module.parameters():
        p.grad = None
    queries = df[schema.names].iloc[:5]
    a = tabular_counterfactual(clf, queries, schema=schema, k=2, seed=3)
    b = tabular_counterfactual(clf, queries, schema=schema, k=2, seed=3)
    assert clf.module.training and all(p.grad is None for p in clf.module.parameters())
    assert torch.equal(a.x, b.x) and torch.equal(a.present, b.present)
    clf.module.eval()


# -- generated table: categorical, integer, immutable, monotone -----------------------------------
def test_categorical_table_respects_every_constraint(loans):
    df, schema, clf = loans
    refused = predict(clf, schema, df).argmax(dim=1) == schema.classes.index("no")
    queries = df[schema.names][refused.numpy()].iloc[:30].reset_index(drop=True)
    res = tabular_counterfactual(clf, queries, "yes", schema=schema, k=3, immutable=["sex"],
                                 monotone={"age": "increase"}, ranges={"income": (10, 80)})
    assert res.found.float().mean() >= 0.9
    table = res.to_frame()
    orig = queries.iloc[table["query"].to_numpy()].reset_index(drop=True)
    # checked here on the DataFrames, not by the library's own violation count
    assert (table["sex"] == orig["sex"]).all()
    assert (table["age"] >= orig["age"]).all()
    changed_income = table["income"] != orig["income"]
    assert table.loc[changed_income, "income"].between(10, 80).all()
    for col in ("age", "children"):
        assert (table[col] == np.round(table[col])).all()
    assert set(table["plan"]) <= {"basic", "plus", "premium"} and set(table["region"]) <= {"n", "s", "e", "w"}
    assert (predict(clf, schema, table[schema.names]).argmax(dim=1) == schema.classes.index("yes")).all()
    assert int(res.violations.nan_to_num(0).sum()) == 0
    # plausible counterfactuals start from other people's rows: the constraints still hold
    near = tabular_counterfactual(clf, queries, "yes", schema=schema, k=3, immutable=["sex"],
                                  monotone={"age": "increase"}, ranges={"income": (10, 80)}, reference=df,
                                  plausibility=0.8)
    t2 = near.to_frame()
    o2 = queries.iloc[t2["query"].to_numpy()].reset_index(drop=True)
    assert near.found.float().mean() >= 0.9
    assert (t2["sex"] == o2["sex"]).all() and (t2["age"] >= o2["age"]).all()
    assert t2.loc[t2["income"] != o2["income"], "income"].between(10, 80).all()
    assert int(near.violations.nan_to_num(0).sum()) == 0
    # fairness helper: per sex, the share flipped and the mean cost of the cheapest, as computed here
    fair = recourse_by_group(res, "sex")
    for _, row in fair.iterrows():
        mask = (queries["sex"] == row["group"]).to_numpy()
        assert row["queries"] == mask.sum()
        assert row["flippable"] == pytest.approx(res.found.numpy()[mask].mean())
        cheapest = res.l1_mad.nan_to_num(np.inf).min(dim=1).values.numpy()[mask]
        assert row["mean_l1_mad"] == pytest.approx(cheapest[np.isfinite(cheapest)].mean())


def test_recourse_fairness_audits_the_negative_decisions_per_group(loans):
    df, schema, clf = loans
    sample = df.iloc[:80]
    table, res = recourse_fairness(clf, sample, "sex", schema=schema, negative="no", target="yes", k=1)
    refused = (predict(clf, schema, sample).argmax(dim=1) == schema.classes.index("no")).numpy()
    assert len(res) == refused.sum()
    assert table["queries"].sum() == refused.sum()
    assert set(table["group"]) == set(sample["sex"][refused])
    assert schema["sex"].immutable is False and res.schema["sex"].immutable      # immutable in this search only
    cfs = res.to_frame()
    assert (cfs["sex"].to_numpy() == sample[refused]["sex"].to_numpy()[cfs["query"]]).all()
    for _, row in table.iterrows():
        mask = sample[refused]["sex"].to_numpy() == row["group"]
        assert row["flippable"] == pytest.approx(res.found.numpy()[mask].mean())
    with pytest.raises(TargetError):
        recourse_fairness(clf, sample, "sex", schema=schema, negative="maybe")


def test_categorical_switch_is_a_valid_category(loans):
    _, schema, clf = loans
    # with every numeric feature frozen, only a category can flip the decision: the plan
    queries = pd.DataFrame([[30, "f", 30.0, "basic", "n", 1], [45, "m", 40.0, "basic", "s", 0]],
                           columns=schema.names)
    res = tabular_counterfactual(clf, queries, "yes", schema=schema, k=2, vary=["plan", "region"])
    assert bool(res.found.all())
    table = res.to_frame()
    assert set(table["plan"]) <= {"plus", "premium"}
    assert (table[["age", "sex", "income", "children"]].to_numpy() ==
            queries.iloc[table["query"]][["age", "sex", "income", "children"]].to_numpy()).all()
    assert (predict(clf, schema, table[schema.names]).argmax(dim=1) == schema.classes.index("yes")).all()


# -- black box: a scikit-learn random forest ------------------------------------------------------
@pytest.mark.slow
def test_random_forest_black_box(cancer):
    from sklearn.ensemble import RandomForestClassifier
    df, schema, _ = cancer
    X = df[schema.names]
    forest = RandomForestClassifier(n_estimators=30, max_depth=5, random_state=0).fit(X, df["target"])
    queries = X.iloc[:40]
    res = tabular_counterfactual(forest, queries, schema=schema, k=3, population=32, generations=20, seed=1)
    assert res.params["method"] == "genetic" and res.params["model_input"] == "frame"
    assert res.found.float().mean() >= 0.95
    table = res.to_frame()
    p = forest.predict_proba(table[schema.names])
    before = forest.predict(queries)[table["query"].to_numpy()]
    assert (forest.classes_[p.argmax(axis=1)] != before).all() and (p.max(axis=1) > 0.5).all()
    assert int(res.violations.nan_to_num(0).sum()) == 0
    assert int(res.redundancy.nan_to_num(0).sum()) == 0
    # a plain callable on schema-space arrays gives the same counterfactuals
    same = tabular_counterfactual(lambda a: forest.predict_proba(pd.DataFrame(a, columns=schema.names)), queries,
                                  schema=schema, k=3, population=32, generations=20, seed=1, model_input="array")
    assert torch.equal(same.x, res.x)


# -- multiclass -----------------------------------------------------------------------------------
def test_multiclass_target_by_name():
    from sklearn.datasets import load_wine
    wine = load_wine(as_frame=True)
    df = wine.frame.assign(target=wine.frame["target"].map({0: "barolo", 1: "grignolino", 2: "barbera"}))
    schema = TabularSchema.from_frame(df, label="target")
    clf = train(schema, df, epochs=150)
    queries = df[schema.names].iloc[:8]       # all of class "barolo"
    res = tabular_counterfactual(clf, queries, "barbera", schema=schema, k=2)
    assert res.classes == schema.classes
    assert bool(res.found.all())
    table = res.to_frame()
    assert (table["target_name"] == "barbera").all()
    assert (predict(clf, schema, table[schema.names]).argmax(dim=1) == schema.classes.index("barbera")).all()


def test_already_at_target_and_nothing_to_change(loans):
    df, schema, clf = loans
    accepted = predict(clf, schema, df).argmax(dim=1) == schema.classes.index("yes")
    q = df[schema.names][accepted.numpy()].iloc[:1]
    res = tabular_counterfactual(clf, q, "yes", schema=schema, k=2)
    assert bool(res.already[0]) and not bool(res.found[0]) and "already" in res.reason[0]
    refused = df[schema.names][(~accepted).numpy()].iloc[:1]
    frozen = tabular_counterfactual(clf, refused, "yes", schema=schema, k=2, vary=[])
    assert not bool(frozen.found[0]) and "no feature may change" in frozen.reason[0]


def test_clear_errors(loans):
    df, schema, clf = loans
    q = df[schema.names].iloc[:2]
    with pytest.raises(TargetError, match="classes"):
        tabular_counterfactual(clf, q, "maybe", schema=schema)
    with pytest.raises(InputError, match="TabularSchema"):
        tabular_counterfactual(clf, q, schema=None)
    with pytest.raises(InputError, match="k=0"):
        tabular_counterfactual(clf, q, schema=schema, k=0)
    with pytest.raises(InputError, match="diversity=1.5"):
        tabular_counterfactual(clf, q, schema=schema, diversity=1.5)
    with pytest.raises(MethodError, match="genetic"):
        tabular_counterfactual(lambda a: np.full((len(a), 2), 0.5), q, schema=schema, method="gradient")
    wrong = Classifier(nn.Linear(3, 2), device="cpu")
    with pytest.raises(InputError, match="schema-space rows"):
        tabular_counterfactual(wrong, q, schema=schema)
    with pytest.raises(InputError, match="predict_proba"):
        tabular_counterfactual(object(), q, schema=schema)

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(schema.width, 2)

        def forward(self, x):
            return self.lin(x.detach())
    with pytest.raises(MethodError, match="genetic"):
        tabular_counterfactual(Classifier(Detached(), device="cpu"), q, schema=schema)
