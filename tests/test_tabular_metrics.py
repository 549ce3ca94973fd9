"""Tabular counterfactual metrics against hand computations and brute force."""
import numpy as np
import pandas as pd
import pytest
import torch

from counterlens.data.tabular import TabularSchema
from counterlens.metrics import tabular as M


@pytest.fixture
def schema():
    df = pd.DataFrame({"age": [20, 30, 40, 50, 60], "income": [10.0, 20.0, 30.0, 40.0, 50.0],
                       "job": ["a", "b", "c", "a", "b"]})
    return TabularSchema.from_frame(df, monotone={"age": "increase"}, immutable=[], scales={"income": 5.0})


def frame(rows):
    return pd.DataFrame(rows, columns=["age", "income", "job"])


def test_l0_and_l1_mad_by_hand(schema):
    orig = frame([[30, 20.0, "a"]])
    cf = frame([[30, 20.0, "a"], [40, 20.0, "a"], [30, 30.0, "b"], [50, 10.0, "c"]])
    assert M.l0(schema, cf, orig).tolist() == [0, 1, 2, 3]
    age_mad = schema["age"].scale          # MAD of 20..60 = 10
    assert age_mad == 10
    expected = [0, 10 / age_mad, 10 / 5 + 1, 20 / age_mad + 10 / 5 + 1]
    assert M.l1_mad(schema, cf, orig).tolist() == pytest.approx(expected)
    assert M.changed_features(schema, cf, orig)[3].tolist() == [True, True, True]


def test_every_kind_of_violation_is_found(schema):
    s = schema.constrained(immutable=["income"], ranges={"job": ["a", "b"]})
    orig = frame([[30, 20.0, "a"]] * 6)
    cf = frame([[30, 20.0, "b"],          # fine
                [25, 20.0, "a"],          # age decreased (monotone increase)
                [30, 25.0, "a"],          # income immutable
                [70, 20.0, "a"],          # above the range
                [30, 20.0, "c"],          # category not permitted
                [30, 20.0, "zzz"]])       # unknown category
    cf["age"] = cf["age"].astype(float)
    cf.loc[0, "age"] = 30.0
    got = M.violations(s, cf, orig).tolist()
    assert got == [0, 1, 1, 1, 1, 1]
    why = M.violations(s, cf, orig, details=True)
    assert "decreased" in why[1]["age"] and "immutable" in why[2]["income"]
    assert "maximum" in why[3]["age"] and "permitted" in why[4]["job"] and "known" in why[5]["job"]
    half = frame([[31.5, 20.0, "a"]])
    assert M.violations(s, half, orig.iloc[:1]).tolist() == [1]          # non-integer age
    # an original outside the range may stay where it is
    outside = frame([[90, 20.0, "a"]])
    assert M.violations(s, outside, outside).tolist() == [0]


def test_ynn_matches_brute_force(schema):
    rng = np.random.default_rng(0)
    ref = frame([[int(a), float(b), c] for a, b, c in zip(rng.integers(20, 61, 50), rng.uniform(10, 50, 50),
                                                           rng.choice(["a", "b", "c"], 50))])
    ref_cls = torch.tensor(rng.integers(0, 2, 50))
    cf = ref.iloc[:7].copy()
    cf["income"] += 3.0
    cls = torch.tensor([0, 1, 0, 1, 1, 0, 1])
    got = M.ynn(schema, cf, cls, ref, ref_cls, n_neighbors=5)
    # brute force in numpy with the same distance (numeric / scale, category mismatch = 1)
    scale = np.array([schema["age"].scale, 5.0])
    for i in range(7):
        num = np.abs(ref[["age", "income"]].to_numpy() - cf[["age", "income"]].iloc[i].to_numpy()) / scale
        d = num.sum(1) + (ref["job"].to_numpy() != cf["job"].iloc[i])
        nn = np.argsort(d, kind="stable")[:5]
        assert float(got[i]) == pytest.approx(np.mean(ref_cls.numpy()[nn] == int(cls[i])))


def test_redundancy_with_a_known_rule(schema):
    # class 1 iff income > 25 or age > 45: changing both is one change more than needed
    def predict(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        p1 = ((x[:, 1] > 25) | (x[:, 0] > 45)).double()
        return torch.stack([1 - p1, p1], dim=1)
    orig = frame([[30, 20.0, "a"]] * 3)
    cf = frame([[50, 30.0, "a"], [30, 30.0, "a"], [30, 30.0, "b"]])
    assert M.redundancy(predict, schema, cf, orig, target=torch.tensor([1, 1, 1])).tolist() == [2, 0, 1]
    # "any class but the original" reads the same here
    assert M.redundancy(predict, schema, cf, orig, orig=torch.zeros(3)).tolist() == [2, 0, 1]


def test_is_valid_needs_a_strict_lead():
    p = torch.tensor([[0.5, 0.5], [0.4, 0.6], [0.45, 0.55]])
    assert M.is_valid(p, torch.tensor([1, 1, 1])).tolist() == [False, True, True]
    three = torch.tensor([[0.2, 0.45, 0.35], [0.6, 0.3, 0.1]])
    assert M.is_valid(three, orig=torch.tensor([0, 0]), threshold=0.4).tolist() == [True, False]


def test_diversity_by_hand(schema):
    a = frame([[30, 20.0, "a"], [40, 20.0, "a"], [30, 30.0, "b"]])
    d = M.diversity(schema, [a, a.iloc[:1], a.iloc[:0]])
    pair = [1.0, 2.0 + 1.0, 1.0 + 2.0 + 1.0]          # (0,1), (0,2), (1,2) in l1_mad
    assert float(d["l1_mad"][0]) == pytest.approx(np.mean(pair))
    assert float(d["count"][0]) == pytest.approx(np.mean([1 / 3, 2 / 3, 3 / 3]))
    assert d["l1_mad"][1:].tolist() == [0.0, 0.0]
