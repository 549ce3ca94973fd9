"""`counterlens counterfactual --table ...`: the run directory it writes, resuming, black boxes, errors."""
import argparse
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import single_thread
from torch import nn

from counterlens import open_run
from counterlens.cli.tabular import load_tabular_model, tabular_counterfactual_cmd
from counterlens.data.tabular import TabularSchema
from counterlens.errors import InputError, UntrustedModelError

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def table(n=400, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.integers(20, 65, n), "sex": rng.choice(["f", "m"], n),
                       "income": np.round(rng.uniform(10, 100, n), 1),
                       "plan": rng.choice(["basic", "plus", "premium"], n)})
    score = 0.05 * (df["income"] - 50) + df["plan"].map({"basic": -1.0, "plus": 0.0, "premium": 1.0}) \
        + 0.03 * (df["age"] - 40)
    df["ok"] = np.where(score > 0, "yes", "no")
    return df


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tabcli")
    df = table()
    csv = root / "loans.csv"
    df.to_csv(csv, index=False)
    schema = TabularSchema.from_frame(df, label="ok")
    x, y = schema.encode(df), schema.encode_labels(df["ok"])
    torch.manual_seed(0)
    net = nn.Sequential(schema.preprocess(), nn.Linear(schema.width, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    script = root / "model.pt2"
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      str(script))
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    forest = make_pipeline(make_column_transformer((OneHotEncoder(), ["sex", "plan"]), remainder="passthrough"),
                           RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0))
    forest.fit(df.drop(columns="ok"), df["ok"])
    pkl = root / "forest.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump(forest, fh)
    return {"csv": csv, "script": script, "pkl": pkl, "df": df}


def args(**kw):
    base = {"table": None, "label": "ok", "model": None, "factory": None, "weights": None,
            "trust_model_file": False, "immutable": "sex", "monotone": "age:increase", "k": 2, "target": "yes",
            "out": None, "limit": 6, "seed": 0, "batch_size": None, "device": "cpu", "classes": None, "quiet": True}
    base.update(kw)
    return argparse.Namespace(**base)


def test_torch_model_writes_a_resumable_run_directory(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=out)) == 0
    spec = yaml.safe_load((out / "run.yaml").read_text())
    assert spec["counterfactual"]["kind"] == "tabular" and spec["data"]["label"] == "ok"
    assert [f["name"] for f in spec["schema"]["features"]] == ["age", "sex", "income", "plan"]
    assert spec["model"]["sha256"]
    table = open_run(out).tabular_counterfactuals
    rows = list(table[["row_index", "rank", "status", "valid", "violations", "changes", "row"]].itertuples(index=False))
    assert len({r[0] for r in rows}) == 6
    df = files["df"]
    for row_index, rank, status, valid, violations, changes, row in rows:
        assert df.loc[row_index, "ok"] is not None
        if status != "found":
            continue
        cf = json.loads(row)
        assert valid == 1 and violations == 0
        assert cf["sex"] == df.loc[row_index, "sex"] and cf["age"] >= df.loc[row_index, "age"]
        assert set(json.loads(changes)) == {k for k in cf if cf[k] != df.loc[row_index, k]}
    csv = pd.read_csv(out / "counterfactuals.csv")
    assert len(csv) == sum(r[2] == "found" for r in rows)
    assert {"row_index", "rank", "age", "plan", "l0", "l1_mad", "violations", "ynn"} <= set(csv.columns)
    assert "6 rows" in capsys.readouterr().out
    # resuming: nothing is searched again, nothing duplicated
    assert tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=out, limit=8)) == 0
    assert "2 rows (6 already done" in capsys.readouterr().out
    again = open_run(out).tabular_counterfactuals
    assert again.row_index.nunique() == 8 and not again.duplicated(["row_index", "rank"]).any()


def test_threshold_and_plausibility_reach_the_search(files, tmp_path):
    from counterlens.metrics.tabular import ynn
    out = tmp_path / "run"
    assert tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=out, threshold=0.8,
                                           plausibility=0.8, limit=8)) == 0
    spec = yaml.safe_load((out / "run.yaml").read_text())["counterfactual"]
    assert spec["threshold"] == 0.8 and spec["plausibility"] == 0.8 and spec["diversity"] == 0.8
    csv = pd.read_csv(out / "counterfactuals.csv")
    assert len(csv) >= 8 and (csv["prob_target"] >= 0.8).all() and (csv["violations"] == 0).all()
    # the recorded yNN agrees with one computed here from the table and the rows written
    df = files["df"]
    schema = TabularSchema.from_frame(df, label="ok")
    clf = load_tabular_model(args(table=files["csv"], model=files["script"]))[0]
    with torch.no_grad():
        ref_class = clf.forward(schema.encode(df)).argmax(1)
    cls = torch.full((len(csv),), schema.classes.index("yes"))
    mine = ynn(schema, csv[schema.names], cls, df[schema.names], ref_class)
    assert np.allclose(mine.numpy(), csv["ynn"].to_numpy()) and float(mine.mean()) >= 0.8 * 0.9
    # threshold 0 (the goal class only has to lead) is kept, not replaced by the default
    zero = tmp_path / "zero"
    assert tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=zero, threshold=0.0,
                                           limit=2)) == 0
    assert yaml.safe_load((zero / "run.yaml").read_text())["counterfactual"]["threshold"] == 0.0


@pytest.mark.slow
def test_pickled_pipeline_needs_trust_and_runs_as_a_black_box(files, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(UntrustedModelError, match="--trust-model-file"):
        tabular_counterfactual_cmd(args(table=files["csv"], model=files["pkl"], out=out))
    assert tabular_counterfactual_cmd(args(table=files["csv"], model=files["pkl"], out=out, trust_model_file=True,
                                           limit=4)) == 0
    spec = yaml.safe_load((out / "run.yaml").read_text())
    assert spec["model"]["description"] == "Pipeline"
    with open(files["pkl"], "rb") as fh:
        forest = pickle.load(fh)
    csv = pd.read_csv(out / "counterfactuals.csv")
    assert len(csv) >= 4
    assert (forest.predict(csv[["age", "sex", "income", "plan"]]) == "yes").all()
    df = files["df"]
    assert (csv["sex"].to_numpy() == df.loc[csv["row_index"], "sex"].to_numpy()).all()
    assert (csv["age"].to_numpy() >= df.loc[csv["row_index"], "age"].to_numpy()).all()


def test_argument_errors_are_clear(files, tmp_path):
    with pytest.raises(InputError, match="age:increase"):
        tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=tmp_path / "r",
                                        monotone="age"))
    with pytest.raises(InputError, match="--label"):
        tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=tmp_path / "r", label="y"))
    with pytest.raises(InputError, match="not feature columns"):
        tabular_counterfactual_cmd(args(table=files["csv"], model=files["script"], out=tmp_path / "r",
                                        immutable="gender"))


def test_the_models_schema_is_used_and_checked_against_the_table(files, tmp_path):
    """A table whose columns were reordered and that lacks a category the model was trained with
    is encoded into the model's slots when its schema is saved next to it; without one, a warning."""
    df = files["df"]
    model = tmp_path / "credit.pt2"
    model.write_bytes(files["script"].read_bytes())
    trained = TabularSchema.from_frame(df, label="ok")
    shifted = df[df.plan != "basic"][["plan", "ok", "income", "sex", "age"]].reset_index(drop=True)
    csv = tmp_path / "later.csv"
    shifted.to_csv(csv, index=False)
    assert TabularSchema.from_frame(shifted, label="ok").width != trained.width     # read from it: wrong slots
    with pytest.warns(UserWarning, match="no schema saved with the model"):
        with pytest.raises(InputError, match="cannot take the table's rows"):      # and here: a width mismatch
            tabular_counterfactual_cmd(args(table=csv, model=model, out=tmp_path / "r0"))
    trained.save(tmp_path / "credit.schema.json")
    assert tabular_counterfactual_cmd(args(table=csv, model=model, out=tmp_path / "r1")) == 0
    spec = yaml.safe_load((tmp_path / "r1" / "run.yaml").read_text())
    assert [c for f in spec["schema"]["features"] if f["name"] == "plan" for c in f["categories"]] == \
        ["basic", "plus", "premium"]
    renamed = shifted.assign(plan=shifted.plan.replace({"plus": "silver"}))
    renamed.to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(InputError, match=r"categories \['silver'\] the schema does not know"):
        tabular_counterfactual_cmd(args(table=tmp_path / "renamed.csv", model=model, out=tmp_path / "r2"))
