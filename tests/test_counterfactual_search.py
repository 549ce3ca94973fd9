"""Counterfactual search on real data (sklearn's digits with a small CNN trained here): validity,
targets, exact constraints, determinism, batched == one-by-one, candidates, diagnostics, the
model left as found, the lambda bisection against the closed form of a linear model, prior terms."""
import math
import time

import pytest
import torch
from conftest import digits_cnn, fit_digits, single_thread
from torch import nn

import counterlens as cl
from counterlens.counterfactual import CounterfactualResult, counterfactual
from counterlens.counterfactual.constraints import (
    elastic_distance,
    project,
    resolve_editable,
    total_variation,
)
from counterlens.errors import InputError, TargetError

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits (1797 real 8x8 scans, 0..16) scaled to [0, 1], [N, 1, 8, 8]; seeded split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def clf(digits):
    x, y, xt, yt = digits
    torch.manual_seed(0)
    net = fit_digits(digits_cnn(), x, y, epochs=12)
    c = cl.Classifier(net, classes=NAMES, device="cpu", value_range=(0.0, 1.0))
    acc = float((c.predict(xt) == yt).float().mean())
    assert acc >= 0.95, acc
    return c


def test_other_is_valid_for_95_percent_of_100_test_digits(clf, digits):
    x = digits[2][:100]
    t0 = time.perf_counter()
    res = counterfactual(clf, x)                 # the defaults
    seconds = time.perf_counter() - t0
    assert isinstance(res, CounterfactualResult) and len(res) == 100
    rate = float(res.valid.float().mean())
    print(f"digits target='other': validity {rate:.2f}, {seconds:.1f} s for 100 images, "
          f"mean L1 {float(res.distance['l1'].mean()):.3f}, mean L2 {float(res.distance['l2'].mean()):.3f}, "
          f"mean iterations {float(res.iterations.float().mean()):.0f}")
    assert rate >= 0.95
    # independent re-evaluation of what the result claims
    probs = clf.probs(res.x)
    assert torch.allclose(probs, res.probs_after, atol=1e-5)
    assert torch.allclose(clf.probs(x), res.probs_before, atol=1e-6)
    pred = probs.argmax(1)
    v = res.valid
    assert (pred[v] != res.pred_before[v]).all() and (pred[v] == res.target[v]).all()
    assert (probs[v].gather(1, res.target[v, None]) >= 0.5).all()
    assert all((r == "") == bool(ok) for r, ok in zip(res.reason, v))
    # distances are the norms of the edit
    d = (res.x - x).flatten(1).double()
    assert torch.allclose(res.distance["l1"], d.abs().sum(1)) and torch.allclose(res.distance["l2"], d.norm(dim=1))
    assert torch.allclose(res.distance["linf"], d.abs().amax(1))
    assert (res.distance["l0"] <= 64).all() and (res.distance["l2"][v] > 0).all()
    rows = res.summary()
    assert len(rows) == 100 and rows[0]["target_name"] in NAMES and "distance_l2" in rows[0]


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_target_by_name_and_by_int(clf, digits, schedule):
    xt, yt = digits[2], digits[3]
    x = xt[yt != 3][:8]
    kw = {"steps": 200, "lam_steps": 3, "early_stop": 20, "schedule": schedule}
    by_name = counterfactual(clf, x, target="three", **kw)
    by_int = counterfactual(clf, x, target=3, **kw)
    assert torch.equal(by_name.x, by_int.x) and torch.equal(by_name.target, torch.full((8,), 3))
    assert float(by_name.valid.float().mean()) >= 0.85
    assert (clf.predict(by_name.x)[by_name.valid] == 3).all()
    per_row = counterfactual(clf, x[:2], target=["three", 5], **kw)
    assert per_row.target.tolist() == [3, 5]


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_constraints_hold_exactly(clf, digits, schedule):
    x = digits[2][:12]
    centre = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    centre[..., 2:6, 1:7] = True
    res = counterfactual(clf, x, editable=centre, candidates=2, steps=200, lam_steps=3, early_stop=20, seed=1,
                         schedule=schedule)
    for out in (res.x, res.candidates[:, 0], res.candidates[:, 1]):
        assert torch.equal(out[~centre.expand_as(x)], x[~centre.expand_as(x)])
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert float(res.valid.float().mean()) >= 0.5
    # a per-image mask and a narrower data-space range given as tensors
    per_image = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    res = counterfactual(clf, x, editable=per_image, value_range=(torch.tensor(0.0), torch.tensor(1.0)),
                         steps=100, lam_steps=2, early_stop=20, schedule=schedule)
    assert torch.equal(res.x[~per_image], x[~per_image]) and res.x.min() >= 0 and res.x.max() <= 1


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_determinism_and_chunking(clf, digits, schedule):
    x = digits[2][:5]
    kw = {"candidates": 2, "steps": 100, "lam_steps": 2, "early_stop": 20, "schedule": schedule}
    a = counterfactual(clf, x, seed=7, **kw)
    b = counterfactual(clf, x, seed=7, **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.candidates, b.candidates) and torch.equal(a.lam, b.lam)
    chunked = counterfactual(clf, x, seed=7, batch_size=3, **kw)
    assert torch.allclose(chunked.candidates, a.candidates, atol=1e-5)
    other_seed = counterfactual(clf, x, seed=8, **kw)
    assert not torch.equal(other_seed.candidates[:, 1], a.candidates[:, 1])


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_stale_active_rows_change_nothing(clf, digits, monkeypatch, schedule):
    """On a GPU the active rows are looked up every few steps only (no sync per step); rows that
    finished in between are evaluated but frozen. Forcing that cadence on the CPU must give the
    same result up to the rounding of a different batch composition."""
    from counterlens.counterfactual import adaptive, bisection
    x = digits[2][40:48]
    kw = {"steps": 120, "lam_steps": 3, "early_stop": 15, "candidates": 2, "schedule": schedule}
    every_step = counterfactual(clf, x, **kw)
    if schedule == "adaptive":
        monkeypatch.setitem(adaptive.COMPACT_EVERY, "cpu", 8)
    else:
        monkeypatch.setitem(bisection.REFRESH, "cpu", 10)
    stale = counterfactual(clf, x, **kw)
    assert torch.allclose(stale.candidates, every_step.candidates, atol=1e-5)
    assert torch.equal(stale.iterations, every_step.iterations) and torch.equal(stale.lam_tried, every_step.lam_tried)


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_batched_equals_one_by_one(clf, digits, schedule):
    x = digits[2][20:26]
    kw = {"steps": 150, "lam_steps": 3, "early_stop": 20, "seed": 3, "schedule": schedule}
    together = counterfactual(clf, x, **kw)
    for i in range(6):
        alone = counterfactual(clf, x[i:i + 1], **kw)
        assert torch.allclose(alone.x, together.x[i:i + 1], atol=1e-5)
        assert bool(alone.valid[0]) == bool(together.valid[i])
        assert torch.allclose(alone.lam, together.lam[i:i + 1])


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_several_candidates_are_diverse(clf, digits, schedule):
    x = digits[2][30:36]
    res = counterfactual(clf, x, candidates=3, steps=150, lam_steps=3, early_stop=20, schedule=schedule)
    assert res.candidates.shape == (6, 3, 1, 8, 8) and res.candidates_valid.shape == (6, 3)
    assert res.lam_tried.shape == (6, 3, 3 if schedule == "bisection" else 2)
    # the returned counterfactual is the valid candidate with the smallest elastic distance
    for i in range(6):
        ok = res.candidates_valid[i]
        if ok.any():
            dist = elastic_distance(res.candidates[i] - x[i], 1.0, 1.0)
            dist[~ok] = math.inf
            assert torch.equal(res.x[i], res.candidates[i, int(dist.argmin())])
    gaps = [float((res.candidates[:, a] - res.candidates[:, b]).flatten(1).norm(dim=1).min())
            for a, b in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 1e-2


@pytest.mark.parametrize("schedule", ["adaptive", "bisection"])
def test_impossible_case_returns_candidate_and_reason(clf, digits, schedule):
    x = digits[2][:3]
    one_pixel = torch.zeros(8, 8, dtype=torch.bool)
    one_pixel[0, 0] = True
    res = counterfactual(clf, x, editable=one_pixel, threshold=0.99, steps=60, lam_steps=2, schedule=schedule)
    assert not res.valid.any()
    budget = "in 60 steps" if schedule == "adaptive" else "in 2 rounds of up to 60 steps"
    assert all("not reached" in r and budget in r and "smallest lambda" in r for r in res.reason), res.reason
    assert res.x.shape == x.shape
    changed = (res.x != x)
    assert not changed[:, :, ~one_pixel].any()
    empty = counterfactual(clf, x[:1], editable=torch.zeros(8, 8, dtype=torch.bool), steps=20, lam_steps=1,
                           schedule=schedule)
    assert not empty.valid[0] and "nothing" in empty.reason[0] and torch.equal(empty.x, x[:1])


def test_model_left_as_found(digits):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Dropout(0.3),
                        nn.Flatten(), nn.Linear(8 * 64, 10))
    net.train()
    net[3].eval()                           # mixed modes must come back as they were
    frozen = net[5].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    c = cl.Classifier(net, device="cpu", value_range=(0, 1))
    res = counterfactual(c, digits[2][:4], steps=30, lam_steps=2)
    assert res.valid.dtype == torch.bool
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert not frozen.requires_grad and net[0].weight.requires_grad


def test_lambda_bisection_on_a_linear_model_matches_the_closed_form():
    """Two classes, z = W x + b: with l1 = 0 and tv = 0 the smallest L2 counterfactual is the
    projection of x onto the decision boundary, at distance |m(x)| / ||w1 - w0||."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(2, 16, generator=gen))
        lin[1].bias.zero_()
    c = cl.Classifier(lin, device="cpu", value_range=(-1.0, 2.0))
    x = 0.3 + 0.4 * torch.rand(8, 1, 4, 4, generator=gen)
    w = lin[1].weight.detach()
    wd = w[1] - w[0]
    margin = x.flatten(1) @ wd
    closed = margin.abs() / wd.norm()
    res = counterfactual(c, x, l1=0.0, l2=1.0, tv=0.0, steps=800, lr=0.002, lam_steps=8, early_stop=100,
                         schedule="bisection", prune=False)
    assert res.valid.all()
    ratio = res.distance["l2"] / closed.double()
    assert (ratio >= 0.99).all() and (ratio <= 1.10).all(), ratio
    # the bisection: up by f, f^2, ... while valid (down while not), then geometric means of the
    # bracket; validity is monotone in lambda here, so every valid lambda lies below every invalid one
    tried, ok, f = res.lam_tried[:, 0], res.lam_valid[:, 0], res.params["lam_factor"]
    for i in range(8):
        lo, hi = 0.0, math.inf
        for r in range(tried.shape[1]):
            lam = float(tried[i, r])
            if r:
                prev = float(tried[i, r - 1])
                step = f ** r if ok[i, r - 1] else f ** -r
                expect = math.sqrt(lo * hi) if (lo > 0 and hi < math.inf) else prev * step
                assert lam == pytest.approx(expect, rel=1e-5)
            lo, hi = (max(lo, lam), hi) if ok[i, r] else (lo, min(hi, lam))
        assert lo < hi
        assert float(res.lam[i]) in [float(v) for v in tried[i][ok[i]]]
        assert float(res.lam[i]) >= 0.1 * lo         # close to the largest valid lambda
    print("L2 / closed form:", [round(float(v), 3) for v in ratio])


def test_adaptive_schedule_on_a_linear_model_is_near_the_closed_form():
    """The default schedule on the same linear model: the L2 counterfactual lands within a few
    percent of the exact distance to the boundary, in a few dozen steps."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        lin[1].weight.copy_(torch.randn(2, 16, generator=gen))
        lin[1].bias.zero_()
    c = cl.Classifier(lin, device="cpu", value_range=(-1.0, 2.0))
    x = 0.3 + 0.4 * torch.rand(8, 1, 4, 4, generator=gen)
    wd = lin[1].weight.detach()[1] - lin[1].weight.detach()[0]
    closed = (x.flatten(1) @ wd).abs() / wd.norm()
    res = counterfactual(c, x, l1=0.0, l2=1.0, early_stop=30, prune=False)
    assert res.valid.all()
    ratio = res.distance["l2"] / closed.double()
    print("adaptive L2 / closed form:", [round(float(v), 3) for v in ratio], "steps", res.iterations.tolist())
    assert (ratio >= 0.99).all() and (ratio <= 1.15).all(), ratio
    assert (res.iterations < 200).all()


def test_pruning_never_grows_an_edit_nor_breaks_validity(clf, digits):
    x = digits[2][50:70]
    kw = {"early_stop": 10, "seed": 0}
    raw = counterfactual(clf, x, prune=False, **kw)
    pruned = counterfactual(clf, x, prune=True, **kw)
    assert torch.equal(raw.valid, pruned.valid)
    v = raw.valid
    assert (pruned.distance["l1"][v] <= raw.distance["l1"][v] + 1e-6).all()
    assert (pruned.distance["l0"][v] <= raw.distance["l0"][v]).all()
    # pruning only removes changes: every changed element of the pruned edit has the raw edit's value
    changed = pruned.x != x
    assert torch.equal(pruned.x[changed], raw.x[changed])
    assert float(pruned.distance["l0"][v].float().mean()) < float(raw.distance["l0"][v].float().mean())


def test_constraint_helpers():
    d = torch.randn(2, 3, 4, 5, 6)
    manual = sum(d.diff(dim=a).abs().flatten(1).mean(1) for a in (2, 3, 4))
    assert torch.allclose(total_variation(d), manual)
    assert torch.allclose(total_variation(torch.randn(2, 1, 7)[:, :, :1]), torch.zeros(2))
    flat = d.flatten(1)
    assert torch.allclose(elastic_distance(d, 2.0, 3.0), 2 * flat.abs().mean(1) + 3 * flat.square().mean(1))
    x = torch.rand(2, 3, 4, 4)
    m = resolve_editable(torch.ones(4, 4, dtype=torch.bool).tril(), x)
    low, high = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    out = project(x + 5 * torch.randn_like(x), x, low, high, m)
    assert torch.equal(out[~m], x[~m]) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(InputError, match="editable"):
        resolve_editable(torch.ones(1, 1, 3, 3, dtype=torch.bool), x)
    with pytest.raises(InputError, match="0/1"):
        resolve_editable(torch.full((4, 4), 0.5), x)


def test_argument_errors(clf, digits):
    x = digits[2][:2]
    with pytest.raises(InputError, match="low must be below high"):
        counterfactual(clf, x, value_range=(1.0, 0.0))
    with pytest.raises(InputError, match="outside value_range"):
        counterfactual(clf, x * 3)
    with pytest.raises(InputError, match="threshold"):
        counterfactual(clf, x, threshold=1.5)
    with pytest.raises(InputError, match="loss"):
        counterfactual(clf, x, loss="mse")
    with pytest.raises(InputError, match="steps"):
        counterfactual(clf, x, steps=0)
    with pytest.raises(TargetError, match="eleven"):
        counterfactual(clf, x, target="eleven")
    with pytest.raises(InputError, match="prior"):
        counterfactual(clf, x, prior_weight=1.0)
    with pytest.raises(InputError, match="prototypes"):
        counterfactual(clf, x, prior=PCAPrior(x, 4), proto_weight=1.0)
    with pytest.raises(InputError, match="editable"):
        counterfactual(clf, x, editable=torch.ones(3, 1, 8, 8, dtype=torch.bool))


# -- prior terms ----------------------------------------------------------------------------------
class PCAPrior:
    """A linear 'autoencoder' (PCA on the training digits): encode/decode/reconstruction_error."""

    def __init__(self, x, k):
        flat = x.flatten(1)
        self.mean = flat.mean(0)
        self.v = torch.linalg.svd(flat - self.mean, full_matrices=False).Vh[:k].T.contiguous()   # [64, k]
        self.shape = x.shape[1:]

    def encode(self, x):
        return (x.flatten(1) - self.mean) @ self.v

    def decode(self, z):
        return (z @ self.v.T + self.mean).view(-1, *self.shape)

    def reconstruction_error(self, x):
        return (self.decode(self.encode(x)) - x).square().flatten(1).mean(1)


def test_prior_terms_with_a_linear_prior(clf, digits):
    x_train, y_train, xt, yt = digits
    prior = PCAPrior(x_train, 12)
    x = xt[yt != 3][:16]
    kw = {"target": "three", "steps": 200, "lam_steps": 3, "early_stop": 20}
    plain = counterfactual(clf, x, **kw)
    with_rec = counterfactual(clf, x, prior=prior, prior_weight=10.0, **kw)
    def rec(r):
        return float(prior.reconstruction_error(r.x)[r.valid].mean())

    assert rec(with_rec) < rec(plain)
    protos = torch.stack([prior.encode(x_train[y_train == c]).mean(0) for c in range(10)])
    guided = counterfactual(clf, x, prior=prior, prototypes=protos, proto_weight=1.0, **kw)

    def gap(r):
        return float((prior.encode(r.x) - protos[3]).norm(dim=1)[r.valid].mean())

    assert gap(guided) < gap(plain)
    latent = counterfactual(clf, x, prior=prior, latent=True, **kw)
    assert float(latent.valid.float().mean()) >= 0.8
    assert rec(latent) < rec(plain)
    for r in (with_rec, guided, latent):
        assert float(r.valid.float().mean()) >= 0.8 and r.x.min() >= 0 and r.x.max() <= 1
    # latent mode keeps the mask exact too
    top = torch.zeros(8, 8, dtype=torch.bool)
    top[:5] = True
    masked = counterfactual(clf, x[:4], prior=prior, latent=True, editable=top, steps=100, lam_steps=2, target=3)
    assert torch.equal(masked.x[:, :, ~top], x[:4, :, ~top])


def test_prior_terms_with_the_autoencoder_prior(clf, digits):
    """The same terms with counterlens' own convolutional autoencoder prior, fitted here."""
    from counterlens.counterfactual.prior import class_prototypes, fit_prior
    x_train, y_train, xt, yt = digits
    prior = fit_prior(x_train, epochs=10, seed=0, progress=False)
    protos = class_prototypes(prior, x_train, y_train, 10)
    x = xt[yt != 3][:16]
    kw = {"target": "three", "steps": 200, "lam_steps": 3, "early_stop": 20}
    plain = counterfactual(clf, x, **kw)
    with_rec = counterfactual(clf, x, prior=prior, prior_weight=100.0, **kw)
    guided = counterfactual(clf, x, prior=prior, prototypes=protos, proto_weight=1.0, **kw)
    latent = counterfactual(clf, x, prior=prior, latent=True, **kw)

    def rec(r):
        return float(prior.reconstruction_error(r.x)[r.valid].mean())

    def gap(r):
        return float((prior.encode(r.x) - protos[3]).flatten(1).norm(dim=1)[r.valid].mean())

    assert rec(with_rec) < rec(plain) and gap(guided) < gap(plain) and rec(latent) < 0.5 * rec(plain)
    for r in (with_rec, guided, latent):
        assert float(r.valid.float().mean()) >= 0.8 and r.x.min() >= 0 and r.x.max() <= 1
    assert all(not p.requires_grad or p.grad is None for p in prior.parameters())


@pytest.mark.parametrize("dims", [1, 3])
def test_other_spatial_dimensions(dims):
    """1D signals and 3D volumes: the same call, total variation over every spatial axis, exact box and mask."""
    torch.manual_seed(0)
    conv = nn.Conv1d if dims == 1 else nn.Conv3d
    shape = (4, 1) + (6,) * dims
    net = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 ** dims, 3))
    with torch.no_grad():
        net[-1].weight.mul_(30.0)           # confident enough for probability 0.5 to be reachable
    c = cl.Classifier(net, device="cpu", value_range=(0, 1))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mask = torch.rand((1, 1) + (6,) * dims, generator=torch.Generator().manual_seed(1)) > 0.3
    res = counterfactual(c, x, tv=0.5, editable=mask, steps=150, lam_steps=5)
    assert res.x.shape == x.shape and res.valid.float().mean() >= 0.5     # a random model: some rows are hard
    assert torch.equal(res.x[~mask.expand_as(x)], x[~mask.expand_as(x)]) and res.x.min() >= 0 and res.x.max() <= 1


def test_top_level_entry_point_is_the_same_search(clf, digits):
    """``counterlens.counterfactual(...)`` (the callable subpackage) is the image search, and the
    subpackage's modules stay importable."""
    import importlib

    import counterlens.counterfactual.search as search_module
    x = digits[2][:4]
    a = cl.counterfactual(clf, x, target="other", steps=60)
    b = search_module.counterfactual(clf, x, target="other", steps=60)
    assert isinstance(a, CounterfactualResult) and torch.equal(a.x, b.x) and torch.equal(a.valid, b.valid)
    assert importlib.import_module("counterlens.counterfactual.prior").fit_prior is cl.counterfactual.fit_prior
