"""Deletion / insertion curves and MuFidelity: closed forms on a linear model, a naive per-image loop
as reference for the batched curves, independence of the chunk size, and Quantus's PixelFlipping."""
import math

import numpy as np
import pytest
import torch
from conftest import TinyCNN, single_thread
from torch import nn

import counterlens as cl
from counterlens.errors import InputError
from counterlens.metrics.faithfulness import cost, deletion, insertion, mufidelity, perturbation_curve, pixel_ranks

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def linear_clf(shape=(1, 6, 6), seed=0):
    """Two classes, logits (w . x + 0.1, 0): the target-1 probability is increasing in w . x."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    lin = nn.Linear(n, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0] = torch.randn(n, generator=gen)
        lin.bias.copy_(torch.tensor([0.1, 0.0]))
    return cl.Classifier(nn.Sequential(nn.Flatten(), lin), device="cpu"), lin.weight[0].detach().view(shape)


def test_linear_model_attribution_order_is_provably_best():
    """For f = w . x and a zero baseline, deleting pixels in decreasing w*x order removes the k largest
    contributions: no other order can give a lower logit (or probability) after k deletions."""
    clf, w = linear_clf()
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    best = (w * x)[:, 0]
    others = [torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    others += [w.abs().expand(4, 1, 6, 6)[:, 0], x[:, 0], -best]
    for kind, order, sign in (("deletion", "morf", 1), ("insertion", "morf", -1), ("deletion", "lerf", -1)):
        ref = perturbation_curve(clf, x, best, 0, kind=kind, order=order, steps=36, baseline="zero")
        assert ref.y.shape == (4, 37) and torch.allclose(ref.x, torch.linspace(0, 1, 37))
        for m in others:
            other = perturbation_curve(clf, x, m, 0, kind=kind, order=order, steps=36, baseline="zero")
            assert (sign * (other.y - ref.y) >= -1e-6).all(), (kind, order)
            assert (sign * (other.auc - ref.auc) >= -1e-6).all()
    # start and end points: the image and the baseline
    d = deletion(clf, x, best, 0, steps=6, baseline="zero")
    torch.testing.assert_close(d.y[:, 0], clf.probs(x)[:, 0])
    torch.testing.assert_close(d.y[:, -1], clf.probs(torch.zeros_like(x))[:, 0])


def naive_curve(clf, x, maps, target, kind, order, steps, base):
    """One image and one step at a time, with numpy's argsort (maps without ties)."""
    out = []
    n = maps[0].numel()
    for i in range(len(x)):
        flat = maps[i].flatten().numpy()
        seq = np.argsort(-flat if order == "morf" else flat, kind="stable")
        row = []
        for k in range(steps + 1):
            count = int(round(k * n / steps))
            changed = np.zeros(n, bool)
            changed[seq[:count]] = True
            changed = torch.from_numpy(changed).view(1, 1, *x.shape[2:])
            start, end = (x[i:i + 1], base[i:i + 1]) if kind == "deletion" else (base[i:i + 1], x[i:i + 1])
            row.append(float(clf.probs(torch.where(changed, end, start))[0, target[i]]))
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("kind,order", [("deletion", "morf"), ("insertion", "morf"), ("deletion", "lerf")])
def test_batched_curve_equals_naive_loop(kind, order):
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(n_classes=3, size=16), device="cpu")
    x = torch.rand(3, 1, 16, 16)
    maps = torch.randn(3, 16, 16)
    target = torch.tensor([0, 2, 1])
    base = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    ref = naive_curve(clf, x, maps, target, kind, order, 10, base)
    for batch_size in (64, 7, 1):
        got = perturbation_curve(clf, x, maps, target, kind=kind, order=order, steps=10, baseline="mean",
                                 batch_size=batch_size)
        torch.testing.assert_close(got.y, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.auc, torch.from_numpy(np.trapezoid(ref.numpy(), got.x.numpy(), axis=1)).float(),
                                   rtol=1e-5, atol=1e-6)
        assert got.evaluations == cost(kind, 3, steps=10) == 33
        assert got.calls == math.ceil(33 / batch_size)


def test_1d_and_3d_inputs_and_blur_baseline():
    clf1, w1 = linear_clf((2, 20))
    x1 = torch.rand(2, 2, 20)
    c1 = deletion(clf1, x1, (w1 * x1).sum(1), 0, steps=5, baseline="blur")
    assert c1.y.shape == (2, 6) and torch.isfinite(c1.auc).all()
    clf3, w3 = linear_clf((1, 4, 5, 6))
    x3 = torch.rand(2, 1, 4, 5, 6)
    best = (w3 * x3)[:, 0]
    d = deletion(clf3, x3, best, 0, steps=12, baseline="zero")
    r = deletion(clf3, x3, torch.rand(2, 4, 5, 6), 0, steps=12, baseline="zero")
    assert (d.y <= r.y + 1e-6).all()
    i = insertion(clf3, x3, best, 0, steps=12, baseline=0.0)
    r_ins = insertion(clf3, x3, torch.rand(2, 4, 5, 6), 0, steps=12, baseline=0.0)
    assert (i.y >= r_ins.y - 1e-6).all() and (i.auc > r_ins.auc).all()


def test_ties_are_broken_by_seed_not_raster_order():
    ranks = pixel_ranks(torch.zeros(2, 100, dtype=torch.float64), "morf", seed=0)
    assert sorted(ranks[0].tolist()) == list(range(100))
    assert ranks[0].tolist() != list(range(100))              # not the raster scan
    assert torch.equal(ranks, pixel_ranks(torch.zeros(2, 100, dtype=torch.float64), "morf", seed=0))
    assert not torch.equal(ranks, pixel_ranks(torch.zeros(2, 100, dtype=torch.float64), "morf", seed=1))
    m = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    assert pixel_ranks(m, "morf").tolist() == [[0, 2, 1]]
    assert pixel_ranks(m, "lerf").tolist() == [[2, 0, 1]]


def test_mufidelity_closed_form_on_linear_model():
    """Logit output, zero baseline, map = w * x: the drop of each subset is exactly its attribution mass."""
    clf, w = linear_clf()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    exact = mufidelity(clf, x, (w * x)[:, 0], 0, baseline="zero", output="logit", n_subsets=16)
    torch.testing.assert_close(exact.drop, exact.mass, rtol=1e-4, atol=1e-5)
    assert (exact.value > 1 - 1e-5).all()
    assert exact.evaluations == cost("mufidelity", 3, n_subsets=16) == 51
    noise = mufidelity(clf, x, torch.randn(3, 6, 6), 0, baseline="zero", output="logit", n_subsets=16)
    assert noise.value.abs().mean() < 0.6
    # fixed subset size: a map of ones sums to the subset size
    ones = mufidelity(clf, x, torch.ones(3, 6, 6), 0, n_subsets=8, subset_fraction=0.25)
    assert (ones.mass == 9).all() and torch.isnan(ones.value).all()   # constant mass: no correlation
    # the chunk size does not change the subsets
    again = mufidelity(clf, x, (w * x)[:, 0], 0, baseline="zero", output="logit", n_subsets=16, batch_size=5)
    torch.testing.assert_close(again.mass, exact.mass)


def test_probability_is_the_default_score_and_seeds_repeat():
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(n_classes=3, size=16), device="cpu")
    x, maps = torch.rand(2, 1, 16, 16), torch.rand(2, 16, 16)
    c = deletion(clf, x, maps, steps=4)
    assert ((c.y >= 0) & (c.y <= 1)).all()
    torch.testing.assert_close(c.y[:, 0], clf.probs(x).max(dim=1).values)
    logit = deletion(clf, x, maps, steps=4, output="logit")
    torch.testing.assert_close(logit.y[:, 0], clf.logits(x).max(dim=1).values.detach())
    a, b = mufidelity(clf, x, maps, seed=3), mufidelity(clf, x, maps, seed=3)
    assert torch.equal(a.drop, b.drop) and not torch.equal(a.drop, mufidelity(clf, x, maps, seed=4).drop)


def test_errors_name_the_argument():
    clf, w = linear_clf()
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(InputError, match="maps has shape"):
        deletion(clf, x, torch.rand(2, 1, 6, 6))
    with pytest.raises(InputError, match="baseline="):
        deletion(clf, x, torch.rand(2, 6, 6), baseline="noise")
    with pytest.raises(InputError, match="steps="):
        deletion(clf, x, torch.rand(2, 6, 6), steps=0)
    with pytest.raises(InputError, match="order="):
        deletion(clf, x, torch.rand(2, 6, 6), order="best")
    with pytest.raises(InputError, match="n_subsets="):
        mufidelity(clf, x, torch.rand(2, 6, 6), n_subsets=1)
    with pytest.raises(InputError, match="NaN"):
        insertion(clf, x, torch.full((2, 6, 6), float("nan")))
    with pytest.raises(InputError, match="metric="):
        cost("faithfulness", 3)


@pytest.mark.filterwarnings("ignore:The settings for perturbing input")   # deleting a black pixel changes nothing
def test_deletion_agrees_with_quantus_pixel_flipping(digits):
    """Quantus 0.6 PixelFlipping (black = the image minimum, 0 for these digits; softmax scores) is the
    deletion curve without its first point, at ``features_in_step = N / steps``."""
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    clf = cl.Classifier(net, device="cpu")
    x = digits[2][:6]
    assert (x.flatten(1).amin(1) == 0).all()
    y = clf.predict(x)
    maps = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(5))   # no ties
    ours = deletion(clf, x, maps, y, steps=16, baseline="zero")
    metric = quantus.PixelFlipping(features_in_step=4, perturb_baseline="black", normalise=False, abs=False,
                                   disable_warnings=True)
    theirs = metric(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].numpy(),
                    device="cpu", softmax=True, channel_first=True)
    theirs = torch.tensor(np.asarray(theirs), dtype=torch.float32)
    torch.testing.assert_close(ours.y[:, 1:], theirs, rtol=1e-5, atol=1e-6)
    print(f"\nquantus PixelFlipping vs deletion: max |diff| = {float((ours.y[:, 1:] - theirs).abs().max()):.2e}")
