"""SmoothGrad, SquareGrad and VarGrad: against Captum's NoiseTunnel in distribution, exact limits,
determinism, batch-size invariance, bounded chunks, errors."""
import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, NoiseTunnel, Saliency
from conftest import TinyCNN
from torch import nn

import counterlens as cl
from counterlens.attribution.gradients import (
    saliency,
)
from counterlens.attribution.noise import (
    counter_normal,
    smoothgrad,
    squaregrad,
    vargrad,
)
from counterlens.errors import InputError, MethodError

OURS = {"smoothgrad": smoothgrad, "smoothgrad_sq": squaregrad, "vargrad": vargrad}


def corr(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.fixture
def clf():
    torch.manual_seed(0)
    return cl.Classifier(TinyCNN(size=16), preprocess=cl.Normalize([0.5], [0.25]), device="cpu")


def unit_range_images(n, size=16):
    """Images whose value range is exactly [0, 1], so noise=0.15 is Captum's stdevs=0.15 for every image."""
    x = torch.rand(n, 1, size, size)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0.0, 1.0
    return x


@pytest.mark.parametrize("inner, captum_inner", [("saliency", Saliency), ("input_x_gradient", InputXGradient)])
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_agrees_with_captum_noise_tunnel_in_distribution(clf, inner, captum_inner, nt_type):
    """Captum draws its noise from the global RNG and we from a seeded counter-based generator,
    so single runs cannot be compared bitwise. Both are Monte Carlo estimates of the same
    expectation over x + N(0, (0.15 * range)^2) (range 1 here); with S samples each pixel's error
    shrinks as 1/sqrt(S). Statistic: per-image Pearson correlation of the two maps at S = 400
    (S = 1000 for vargrad, a second moment with more variance) must be >= 0.98, and no worse than
    the correlation between two of our own runs with different seeds minus 0.01, i.e. Captum is as
    close to us as we are to ourselves. On a 1-channel input saliency's channel max of |grad| is
    Captum's |grad| and the channel sum is the identity."""
    x, target = unit_range_images(3), torch.tensor([0, 1, 2])
    samples = 1000 if nt_type == "vargrad" else 400
    ours = OURS[nt_type](clf, x, target, method=inner, samples=samples, noise=0.15, batch_size=500, seed=0)
    again = OURS[nt_type](clf, x, target, method=inner, samples=samples, noise=0.15, batch_size=500, seed=1)
    model = nn.Sequential(clf.preprocess, clf.module).eval()
    theirs = NoiseTunnel(captum_inner(model)).attribute(
        x.clone().requires_grad_(True), target=target, nt_type=nt_type, nt_samples=samples, stdevs=0.15,
        nt_samples_batch_size=500).sum(dim=1).detach()
    assert ours.shape == (3, 16, 16)
    for i in range(3):
        c, self_c = corr(ours[i], theirs[i]), corr(ours[i], again[i])
        assert c >= 0.98, (i, c)
        assert c >= self_c - 0.01, (i, c, self_c)


@pytest.mark.parametrize("inner, params", [("saliency", {}), ("saliency", {"absolute": False}),
                                           ("input_x_gradient", {}), ("guided_backprop", {}),
                                           ("integrated_gradients", {"steps": 6})])
def test_zero_noise_gives_the_inner_method_and_zero_variance(clf, inner, params):
    from counterlens.attribution.base import METHODS
    x, target = torch.rand(3, 1, 16, 16), torch.tensor([2, 0, 1])
    direct = METHODS[inner].function(clf, x, target, **params)
    smooth = smoothgrad(clf, x, target, method=inner, method_params=params, samples=4, noise=0.0, batch_size=5)
    torch.testing.assert_close(smooth, direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(squaregrad(clf, x, target, method=inner, method_params=params, samples=4, noise=0.0),
                               direct ** 2, rtol=1e-5, atol=1e-9)
    var = vargrad(clf, x, target, method=inner, method_params=params, samples=4, noise=0.0, batch_size=5)
    assert var.abs().max() <= 1e-6 * direct.abs().max() ** 2


@pytest.mark.parametrize("method", [smoothgrad, squaregrad, vargrad])
def test_seeded_deterministic_and_batch_size_invariant(clf, method):
    x = torch.rand(3, 1, 16, 16)
    a = method(clf, x, "predicted", samples=7, seed=4, batch_size=5)
    assert torch.equal(a, method(clf, x, "predicted", samples=7, seed=4, batch_size=5))
    assert not torch.allclose(a, method(clf, x, "predicted", samples=7, seed=5, batch_size=5))
    for batch_size in (1, 1000):
        torch.testing.assert_close(a, method(clf, x, "predicted", samples=7, seed=4, batch_size=batch_size),
                                   rtol=1e-5, atol=1e-8)


def test_small_sample_means_by_hand(clf):
    """smoothgrad / squaregrad / vargrad are the mean, mean square and variance of the inner maps on
    the very noisy inputs the method drew (rebuilt here from counter_normal, one row at a time)."""
    x, target, samples, noise = torch.rand(2, 1, 16, 16), torch.tensor([1, 2]), 5, 0.2
    maps = []
    for i in range(2):
        scale = noise * (x[i].max() - x[i].min())
        for s in range(samples):
            eps = counter_normal(9, (torch.tensor([i]), torch.tensor([s])), x[i].numel()).view(1, *x.shape[1:])
            maps.append(saliency(clf, x[i:i + 1] + scale * eps, target[i:i + 1], absolute=False))
    maps = torch.cat(maps).view(2, samples, 16, 16).double()
    kw = {"method": "saliency", "method_params": {"absolute": False}, "samples": samples, "noise": noise, "seed": 9}
    torch.testing.assert_close(smoothgrad(clf, x, target, **kw), maps.mean(1).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(squaregrad(clf, x, target, **kw), (maps ** 2).mean(1).float(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(vargrad(clf, x, target, **kw), maps.var(1, unbiased=False).float(),
                               rtol=1e-4, atol=1e-9)


class RowCounter(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.inner(x)


def test_model_calls_are_bounded_by_batch_size():
    torch.manual_seed(0)
    net = RowCounter(TinyCNN(size=16))
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(3, 1, 16, 16)
    smoothgrad(clf, x, 1, method="integrated_gradients", method_params={"steps": 5}, samples=4, batch_size=5)
    assert max(net.rows) <= 5
    assert sum(net.rows) >= 3 * 4 * 5        # every (image, sample, step) row was evaluated
    net.rows.clear()
    smoothgrad(clf, x, 1, samples=4, batch_size=5)
    assert max(net.rows) <= 5


def test_3d_and_1d_inputs():
    torch.manual_seed(0)
    clf3 = cl.Classifier(TinyCNN(size=8, dims=3), device="cpu")
    out = vargrad(clf3, torch.rand(2, 1, 8, 8, 8), "predicted", samples=3, method="input_x_gradient")
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    net1 = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10, 2))
    out = smoothgrad(cl.Classifier(net1, device="cpu"), torch.rand(2, 3, 10), 1, samples=3)
    assert out.shape == (2, 10)


def test_counter_normal_rows_do_not_depend_on_their_neighbours():
    img, smp = torch.tensor([0, 0, 1, 5, 5]), torch.tensor([0, 1, 0, 3, 4])
    together = counter_normal(11, (img, smp), 4096)
    alone = counter_normal(11, (img[3:4], smp[3:4]), 4096)
    assert torch.equal(together[3], alone[0])
    z = counter_normal(0, (torch.arange(64), torch.zeros(64, dtype=torch.long)), 4096)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    c = torch.corrcoef(z)
    assert (c - torch.eye(64)).abs().max() < 0.08         # rows independent: |r| ~ 1/sqrt(4096) = 0.016
    assert not torch.equal(counter_normal(1, (img, smp), 16), counter_normal(2, (img, smp), 16))


def test_errors_name_the_argument(clf):
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(MethodError, match="gradient methods"):
        smoothgrad(clf, x, 0, method="gradcam")
    with pytest.raises(MethodError, match="gradient methods"):
        smoothgrad(clf, x, 0, method="vargrad")
    with pytest.raises(MethodError, match="absolute"):
        smoothgrad(clf, x, 0, method_params={"stepz": 3})
    with pytest.raises(InputError, match="batch_size"):
        smoothgrad(clf, x, 0, method_params={"batch_size": 3})
    with pytest.raises(InputError, match="samples"):
        vargrad(clf, x, 0, samples=0)
    with pytest.raises(InputError, match="noise"):
        squaregrad(clf, x, 0, noise=-0.1)
