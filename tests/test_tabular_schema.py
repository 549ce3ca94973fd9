"""TabularSchema: kinds, ranges, MAD scales, encode/decode, constraints, preprocess, CSV, errors."""
import numpy as np
import pandas as pd
import pytest
import torch

from counterlens.data.tabular import TabularSchema, mad_scale
from counterlens.errors import DataFileError, InputError


def mixed_frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.integers(20, 60, n),
        "income": np.round(rng.lognormal(3, 0.5, n), 2),
        "job": rng.choice(["clerk", "manager", "nurse"], n),
        "owner": rng.choice([True, False], n),
        "label": rng.choice(["bad", "good"], n),
    })


def test_kinds_ranges_and_scales_follow_the_data():
    df = mixed_frame()
    s = TabularSchema.from_frame(df, label="label")
    assert s.names == ["age", "income", "job", "owner"]
    assert [f.kind for f in s.features] == ["integer", "continuous", "categorical", "categorical"]
    assert s["age"].low == df["age"].min() and s["age"].high == df["age"].max()
    inc = df["income"].to_numpy()
    assert s["income"].scale == pytest.approx(np.median(np.abs(inc - np.median(inc))))
    assert s["job"].categories == ("clerk", "manager", "nurse")
    assert s.width == 1 + 1 + 3 + 2
    assert s.columns[2:5] == ["job=clerk", "job=manager", "job=nurse"]
    assert s.classes == ["bad", "good"]
    # MAD 0 (mostly one value): the standard deviation instead
    values = np.array([1.0] * 9 + [5.0])
    assert mad_scale(values) == pytest.approx(values.std())


def test_encode_decode_round_trip_is_exact_for_categories_and_integers():
    df = mixed_frame()
    s = TabularSchema.from_frame(df, label="label")
    x = s.encode(df)
    assert x.shape == (len(df), s.width) and x.dtype == torch.float32
    blocks = x[:, s.slices["job"]]
    assert torch.equal(blocks.sum(dim=1), torch.ones(len(df)))
    back = s.decode(x)
    assert back["job"].tolist() == df["job"].tolist()
    assert back["owner"].tolist() == df["owner"].tolist()
    assert back["age"].tolist() == df["age"].tolist()
    np.testing.assert_allclose(back["income"], df["income"], rtol=1e-6)
    # values with at most 7 significant digits come back as written, not with float32 noise
    short = pd.DataFrame({**{c: df[c].iloc[:3] for c in s.names}, "income": [7.3, 33.2, 1234.5]})
    assert s.decode(s.encode(short))["income"].tolist() == [7.3, 33.2, 1234.5]
    assert s.decode(s.encode(short), tidy=False)["income"].tolist()[0] == float(np.float32(7.3)) != 7.3
    # a relaxed one-hot decodes to its most likely category
    x[0, s.slices["job"]] = torch.tensor([0.2, 0.5, 0.3])
    assert s.decode(x[:1])["job"].iloc[0] == "manager"


def test_label_encoding_and_preprocess_standardises_numeric_columns_only():
    df = mixed_frame()
    s = TabularSchema.from_frame(df, label="label")
    y = s.encode_labels(df["label"])
    assert y.tolist() == [s.classes.index(v) for v in df["label"]]
    z = s.preprocess()(s.encode(df))
    num = z[:, [s.slices["age"].start, s.slices["income"].start]]
    torch.testing.assert_close(num.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(num.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, s.slices["job"]], s.encode(df)[:, s.slices["job"]])


def test_constraints_narrow_and_validate():
    df = mixed_frame()
    s = TabularSchema.from_frame(df, label="label", immutable=["owner"], monotone={"age": "increase"},
                                 ranges={"income": (0, 1000)})
    assert s["owner"].immutable and s["age"].monotone == "increase" and s["income"].high == 1000
    c = s.constrained(vary=["income", "job"], ranges={"income": (10, 5000), "job": ["clerk", "nurse"]})
    assert [f.immutable for f in c.features] == [True, False, False, True]
    assert (c["income"].low, c["income"].high) == (10, 1000)          # narrowed, never widened
    assert c["job"].allowed == (True, False, True)
    with pytest.raises(InputError, match="categorical"):
        s.constrained(monotone={"job": "increase"})
    with pytest.raises(InputError, match="not features"):
        s.constrained(vary=["salary"])
    with pytest.raises(InputError, match="increase"):
        TabularSchema.from_frame(df, monotone={"age": "up"})
    with pytest.raises(InputError, match="list of its categories"):
        s.constrained(ranges={"job": ["pilot"]})
    with pytest.raises(InputError, match="not a column"):
        TabularSchema.from_frame(df, label="y")


def test_encode_errors_name_the_column_and_the_fix():
    df = mixed_frame()
    s = TabularSchema.from_frame(df, label="label")
    bad = df.copy()
    bad.loc[0, "job"] = "pilot"
    with pytest.raises(InputError, match="'job'.*pilot"):
        s.encode(bad)
    with pytest.raises(InputError, match="lacks the feature columns"):
        s.encode(df.drop(columns=["income"]))
    nan = df.copy()
    nan.loc[1, "income"] = np.nan
    with pytest.raises(InputError, match="missing"):
        s.encode(nan)
    with pytest.raises(InputError, match=r"\[N, 7\]"):
        s.encode(np.zeros((2, 5)))
    # lenient mode for scoring other tools' output: unknown category -> all-zero block
    x = s.encode(bad, strict=False)
    assert float(x[0, s.slices["job"]].sum()) == 0.0
    with pytest.raises(InputError, match="missing values"):
        TabularSchema.from_frame(nan)


def test_csv_and_dict_round_trip(tmp_path):
    df = mixed_frame()
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    s = TabularSchema.from_csv(path, label="label", monotone={"age": "increase"})
    assert s.names == ["age", "income", "job", "owner"]
    again = TabularSchema.from_dict(s.to_dict())
    assert again.names == s.names and again.width == s.width and again["age"].monotone == "increase"
    assert torch.equal(again.encode(df), s.encode(df))
    with pytest.raises(DataFileError, match="no such file"):
        TabularSchema.from_csv(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFileError):
        TabularSchema.from_csv(tmp_path / "empty.csv")
