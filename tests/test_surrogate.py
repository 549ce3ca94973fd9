"""LIME and KernelSHAP against closed forms (exact Shapley values of additive models, brute-force
Shapley values by enumeration), Captum's Lime on the same masks (equal), and Captum's Lime and
KernelShap with their own sampling (within sampling error)."""
import itertools
import math

import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import KernelShap, Lime
from conftest import TinyCNN
from torch import nn

import counterlens as cl
from counterlens.attribution.base import METHODS
from counterlens.attribution.surrogate import (
    draw_coalitions,
    fit_surrogate,
    kernel_shap,
    lime,
    relabel,
    segment,
)
from counterlens.errors import InputError


def corr(a, b):
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def smooth_images(n, channels, size, seed=0):
    """Blobby images (SLIC needs structure: on pure noise it returns few segments)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, channels, *(s // 4 for s in size)), generator=g)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=False)


def linear_clf(shape, n_classes=3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), n_classes))
    return cl.Classifier(net, device="cpu"), net[1]


def linear_shapley(layer, x, target, labels, baseline=0.0):
    """Shapley value of segment j for f = w.x + b: sum over its pixels of w * (x - baseline)."""
    contrib = (layer.weight.detach()[target].view_as(x) * (x - baseline)).sum(1).flatten(1)
    return torch.zeros(x.shape[0], int(labels.max()) + 1).scatter_add_(1, labels.flatten(1), contrib)


def test_registered():
    assert METHODS["lime"].kind == "surrogate" and METHODS["kernel_shap"].kind == "surrogate"
    assert METHODS["lime"].defaults()["samples"] == 1000


@pytest.mark.parametrize("segmentation,shape", [("slic", (1, 24, 24)), ("slic", (3, 24, 24)),
                                                ("grid", (2, 16, 16)), ("slic", (1, 12, 12, 12)),
                                                ("grid", (1, 8, 12, 12)), ("slic", (2, 40))])
def test_kernel_shap_recovers_exact_shapley_values_of_a_linear_model(segmentation, shape):
    """Additive in the segments, so the constrained fit is exact from any sample (here S << 2^F)."""
    clf, layer = linear_clf(shape)
    x = smooth_images(3, shape[0], shape[1:])
    target = torch.tensor([0, 2, 1])
    fit = fit_surrogate(clf, x, target, kind="kernel_shap", segmentation=segmentation, n_segments=20,
                        samples=200, batch_size=64)
    assert (fit.n_features > 10).all()              # sampled, not enumerated
    expected = linear_shapley(layer, x, target, fit.labels)
    torch.testing.assert_close(fit.coef, expected, rtol=1e-4, atol=1e-6)
    maps = kernel_shap(clf, x, target, segmentation=segmentation, n_segments=20, samples=200)
    assert maps.shape == (3, *shape[1:])
    torch.testing.assert_close(maps, expected.gather(1, fit.labels.flatten(1)).view_as(maps), rtol=1e-4, atol=1e-6)


def test_kernel_shap_with_mean_baseline_and_prob_output_still_satisfies_efficiency():
    clf, layer = linear_clf((1, 16, 16))
    x = smooth_images(2, 1, (16, 16))
    fit = fit_surrogate(clf, x, 1, kind="kernel_shap", segmentation="grid", cell=4, baseline="mean", samples=300)
    base = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(fit.coef, linear_shapley(layer, x, torch.tensor([1, 1]), fit.labels, base),
                               rtol=1e-4, atol=1e-6)
    fit = fit_surrogate(clf, x, 1, kind="kernel_shap", segmentation="grid", cell=4, output="prob", samples=300)
    p = clf.probs(torch.cat([x, torch.zeros_like(x)]))[:, 1]
    torch.testing.assert_close(fit.coef.sum(1), p[:2] - p[2:], rtol=1e-5, atol=1e-6)


def brute_force_shapley(clf, x, target, labels, n_features):
    """Shapley values by the definition: weighted marginal contributions over all coalitions."""
    clf.module.eval()
    values = {}
    with torch.no_grad():
        for subset in itertools.product([False, True], repeat=n_features):
            on = torch.tensor(subset)[labels][:, None]
            values[subset] = clf.module(torch.where(on, x, 0.0))[torch.arange(len(x)), target]
    phi = torch.zeros(len(x), n_features)
    for subset, v in values.items():
        k = sum(subset)
        for j in range(n_features):
            if not subset[j]:
                weight = math.factorial(k) * math.factorial(n_features - k - 1) / math.factorial(n_features)
                phi[:, j] += weight * (values[subset[:j] + (True,) + subset[j + 1:]] - v)
    return phi


def test_kernel_shap_enumerates_all_coalitions_and_equals_brute_force_shapley():
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(), device="cpu")
    x = torch.rand(2, 1, 32, 32)
    target = torch.tensor([1, 2])
    fit = fit_surrogate(clf, x, target, kind="kernel_shap", segmentation="grid", cell=(16, 11), samples=62)
    assert fit.n_features.tolist() == [6, 6]          # 2^6 - 2 = 62 coalitions: enumerated
    expected = brute_force_shapley(clf, x, target, fit.labels, 6)
    torch.testing.assert_close(fit.coef, expected, rtol=1e-4, atol=1e-6)
    z, w = draw_coalitions("kernel_shap", 6, 62, seed=0)
    assert z.shape == (62, 6) and len({tuple(r) for r in z.tolist()}) == 62
    torch.testing.assert_close(w[z.sum(1) == 1], torch.full((6,), 5 / 30, dtype=torch.float64))


def test_lime_equals_captum_lime_on_the_same_masks():
    """Same masks (fed to Captum's Lime), Captum's default kernel and a ridge of the same alpha:
    the fit is the same up to solver rounding."""
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(in_channels=3), device="cpu")
    x = smooth_images(2, 3, (32, 32))
    target = torch.tensor([0, 2])
    fit = fit_surrogate(clf, x, target, kind="lime", segmentation="slic", n_segments=25, samples=300,
                        baseline=0.1, seed=7)
    clf.module.eval()
    for i in range(2):
        f = int(fit.n_features[i])
        z, _ = draw_coalitions("lime", f, 300, seed=7)

        def masks(_inp, z=z, **_kwargs):
            yield from (row[None].long() for row in z)

        theirs = Lime(clf.module, interpretable_model=SkLearnRidge(alpha=1.0), perturb_func=masks).attribute(
            x[i:i + 1], target=int(target[i]), baselines=0.1, feature_mask=fit.labels[i][None, None],
            n_samples=300, perturbations_per_eval=100, return_input_shape=False)
        torch.testing.assert_close(fit.coef[i, :f], theirs[0].float(), rtol=1e-4, atol=1e-6)
        assert (fit.coef[i, f:] == 0).all()


@pytest.fixture(scope="module")
def mlp_setup():
    """A small model with interactions between segments, so the fits carry sampling noise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        net[1].weight.mul_(8)
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(1, 1, 16, 16)
    labels, _ = segment(x, "grid", cell=4)                  # 16 features
    return clf, net.eval(), x, labels


@pytest.mark.parametrize("kind", ["lime", "kernel_shap"])
def test_agrees_with_captum_within_sampling_error(mlp_setup, kind):
    """Statistic: Pearson correlation over the 16 coefficients. At 1000 samples ours and Captum's
    (different random streams) correlate >= 0.98 (measured: 0.995-0.998 over 5 seeds); both
    converge to the same limit: at 4000 samples each correlates >= 0.998 with a 100k-sample fit
    (measured >= 0.999), and our correlation with that limit rises from 250 to 4000 samples."""
    clf, net, x, labels = mlp_setup
    limit = fit_surrogate(clf, x, 1, kind=kind, segmentation=labels, samples=100_000, seed=99,
                          batch_size=4096).coef[0]

    def captum(samples, seed):
        torch.manual_seed(seed)
        explainer = Lime(net, interpretable_model=SkLearnRidge(alpha=1.0)) if kind == "lime" else KernelShap(net)
        return explainer.attribute(x, target=1, feature_mask=labels[:, None], n_samples=samples,
                                   perturbations_per_eval=500, return_input_shape=False)[0].detach()

    def ours(samples, seed):
        return fit_surrogate(clf, x, 1, kind=kind, segmentation=labels, samples=samples, seed=seed,
                             batch_size=500).coef[0]

    assert corr(ours(1000, 0), captum(1000, 100)) >= 0.98
    assert corr(ours(4000, 1), limit) >= 0.998 and corr(captum(4000, 101), limit) >= 0.998
    low = np.mean([corr(ours(250, s), limit) for s in range(3)])
    high = np.mean([corr(ours(4000, s), limit) for s in range(3)])
    assert high > low


@pytest.mark.parametrize("method", [lime, kernel_shap])
def test_deterministic_and_batch_size_invariant(method):
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(), device="cpu")
    clf.module.train()                                  # dropout: must run in eval mode, then restored
    x = smooth_images(3, 1, (32, 32))
    a = method(clf, x, 1, n_segments=20, samples=150, batch_size=3, seed=4)
    assert all(m.training for m in clf.module.modules())
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, method(clf, x, 1, n_segments=20, samples=150, batch_size=3, seed=4))
    torch.testing.assert_close(a, method(clf, x, 1, n_segments=20, samples=150, batch_size=1000, seed=4),
                               rtol=1e-4, atol=1e-6)
    assert not torch.equal(a, method(clf, x, 1, n_segments=20, samples=150, batch_size=3, seed=5))


@pytest.mark.parametrize("kind", ["lime", "kernel_shap"])
def test_batched_fit_equals_one_image_at_a_time(kind):
    """Images with different numbers of superpixels (padded in the batch) get the same fit alone."""
    torch.manual_seed(0)
    clf = cl.Classifier(TinyCNN(), device="cpu")
    x = torch.cat([smooth_images(2, 1, (32, 32), seed=1), smooth_images(2, 1, (32, 32), seed=2)])
    target = torch.tensor([0, 1, 2, 1])
    fit = fit_surrogate(clf, x, target, kind=kind, n_segments=30, samples=200)
    assert len(set(fit.n_features.tolist())) > 1
    for i in range(4):
        alone = fit_surrogate(clf, x[i:i + 1], target[i:i + 1], kind=kind, n_segments=30, samples=200)
        f = int(alone.n_features[0])
        assert f == fit.n_features[i] and torch.equal(alone.labels[0], fit.labels[i])
        torch.testing.assert_close(fit.coef[i, :f], alone.coef[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fit.intercept[i], alone.intercept[0], rtol=1e-4, atol=1e-6)


def test_lime_on_3d_volume_and_1d_signal():
    torch.manual_seed(0)
    clf3 = cl.Classifier(TinyCNN(dims=3, size=8), device="cpu")
    vol = smooth_images(2, 1, (8, 8, 8))
    maps = lime(clf3, vol, 1, segmentation="grid", cell=4, samples=100)
    assert maps.shape == (2, 8, 8, 8)
    labels, n = segment(vol, "grid", cell=4)
    assert n.tolist() == [8, 8]
    for cell in torch.unique(labels[0]):                   # one value per grid cell
        assert maps[0][labels[0] == cell].unique().numel() == 1
    clf1, layer = linear_clf((2, 40))
    sig = smooth_images(2, 2, (40,))
    fit = fit_surrogate(clf1, sig, 0, kind="kernel_shap", segmentation="grid", cell=5, samples=100)
    torch.testing.assert_close(fit.coef, linear_shapley(layer, sig, torch.tensor([0, 0]), fit.labels),
                               rtol=1e-4, atol=1e-6)


def test_segmentations():
    x = smooth_images(2, 1, (30, 20))
    labels, n = segment(x, "grid", cell=(10, 7))
    assert n.tolist() == [9, 9] and labels.shape == (2, 30, 20)
    assert segment(x, "grid", n_segments=16)[1].tolist() == [16, 16]
    given = torch.tensor([[5, 5, 9], [-2, 9, 9]])
    dense, n = relabel(given.expand(2, 2, 3))
    assert n.tolist() == [3, 3] and dense[0].tolist() == [[1, 1, 2], [0, 2, 2]]
    dense, n = segment(torch.rand(2, 3, 2, 3), given)
    assert dense.shape == (2, 2, 3) and n.tolist() == [3, 3]
    lab, n = segment(smooth_images(2, 3, (32, 32)), "slic", n_segments=30)
    assert lab.shape == (2, 32, 32) and (n >= 10).all()
    for i in range(2):
        assert torch.equal(torch.unique(lab[i]), torch.arange(int(n[i])))


def test_errors():
    clf, _ = linear_clf((1, 8, 8))
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(InputError, match="segmentation"):
        lime(clf, x, 0, segmentation="watershed")
    with pytest.raises(InputError, match="segmentation"):
        lime(clf, x, 0, segmentation=torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(InputError, match="segmentation"):
        lime(clf, x, 0, segmentation=torch.zeros(8, 8))
    with pytest.raises(InputError, match="samples"):
        kernel_shap(clf, x, 0, samples=0)
    with pytest.raises(InputError, match="cell"):
        lime(clf, x, 0, segmentation="grid", cell=0)
