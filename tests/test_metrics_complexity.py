"""Sparseness (Gini) and entropy against closed forms and Quantus; the IG completeness gap."""
import math

import numpy as np
import pytest
import torch
from conftest import TinyCNN, single_thread
from torch import nn

import counterlens as cl
from counterlens.attribution import integrated_gradients
from counterlens.errors import InputError
from counterlens.metrics.complexity import completeness_error, entropy, sparseness

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.mark.parametrize("shape", [(50,), (7, 9), (3, 4, 5)])
def test_closed_forms_in_1d_2d_3d(shape):
    n = math.prod(shape)
    const = torch.full((2, *shape), -0.7)                    # sign does not matter: |map|
    torch.testing.assert_close(sparseness(const), torch.zeros(2))
    torch.testing.assert_close(entropy(const), torch.full((2,), math.log(n)))
    spike = torch.zeros(2, *shape)
    spike.view(2, -1)[:, 3] = 5.0
    torch.testing.assert_close(sparseness(spike), torch.full((2,), 1 - 1 / n))
    torch.testing.assert_close(entropy(spike), torch.zeros(2))
    half = torch.zeros(1, n)
    half[0, : n // 2] = 1.0                                  # uniform on k pixels: entropy log k
    torch.testing.assert_close(entropy(half.view(1, *shape)), torch.tensor([math.log(n // 2)]))
    zero = torch.zeros(1, *shape)
    assert torch.isnan(sparseness(zero)).all() and torch.isnan(entropy(zero)).all()


def test_gini_closed_form_and_order():
    # sorted a = (0, 1, 2, 3), n = 4: G = sum_i (2i - n - 1) a_(i) / (n sum a) = (0 - 1 + 2 + 9) / 24
    a = torch.tensor([[3.0, 0.0, 2.0, 1.0]])
    assert sparseness(a).item() == pytest.approx(((-3) * 0 + (-1) * 1 + 1 * 2 + 3 * 3) / (4 * 6))
    rng = torch.Generator().manual_seed(0)
    diffuse = torch.rand(4, 32, 32, generator=rng) + 1.0
    focused = diffuse * (torch.rand(4, 32, 32, generator=rng) > 0.9)
    assert (sparseness(focused) > sparseness(diffuse)).all()
    assert (entropy(focused) < entropy(diffuse)).all()


def test_agree_with_quantus():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((5, 1, 12, 12)).astype(np.float32)
    x = rng.random((5, 1, 12, 12)).astype(np.float32)
    y = np.zeros(5, dtype=int)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 2))
    kw = dict(abs=True, normalise=False, disable_warnings=True)
    gini = quantus.Sparseness(**kw)(model=model, x_batch=x, y_batch=y, a_batch=maps.copy(), device="cpu")
    ent = quantus.Complexity(**kw)(model=model, x_batch=x, y_batch=y, a_batch=maps.copy(), device="cpu")
    # Quantus adds 1e-7 to every value before the Gini, and 1e-12 inside the log
    np.testing.assert_allclose(sparseness(maps[:, 0]).numpy(), gini, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy(maps[:, 0]).numpy(), ent, rtol=1e-5, atol=1e-5)


def test_completeness_error_closed_form_and_against_ig_delta():
    torch.manual_seed(0)
    lin = nn.Linear(36, 3)
    clf = cl.Classifier(nn.Sequential(nn.Flatten(), lin), device="cpu")
    x = torch.rand(4, 1, 6, 6)
    target = torch.tensor([0, 1, 2, 1])
    exact = (lin.weight.detach()[target].view(4, 1, 6, 6) * x)[:, 0]      # IG of a linear model, zero baseline
    torch.testing.assert_close(completeness_error(clf, x, exact, target), torch.zeros(4), atol=1e-5, rtol=0)
    assert (completeness_error(clf, x, 2 * exact, target, relative=True) - 1).abs().max() < 1e-4
    # on a CNN the gap equals integrated_gradients' own convergence delta, and shrinks with more steps
    net = TinyCNN(n_classes=3, size=16)
    cnn = cl.Classifier(net, device="cpu")
    xs = torch.rand(3, 1, 16, 16)
    coarse, delta = integrated_gradients(cnn, xs, steps=2, rule="riemann_right", return_delta=True)
    gap = completeness_error(cnn, xs, coarse)
    torch.testing.assert_close(gap, delta.float(), rtol=1e-4, atol=1e-5)
    fine = integrated_gradients(cnn, xs, steps=32)
    assert completeness_error(cnn, xs, fine).abs().max() < gap.abs().max()
    blur = integrated_gradients(cnn, xs, steps=32, baseline="blur")
    right = completeness_error(cnn, xs, blur, baseline="blur").abs()
    wrong = completeness_error(cnn, xs, blur, baseline="zeros").abs()      # the baseline must match the maps'
    assert (right < 0.1 * wrong).all(), (right, wrong)


def test_errors():
    with pytest.raises(InputError, match="maps has shape"):
        sparseness(torch.rand(5))
    with pytest.raises(InputError, match="NaN"):
        entropy(torch.tensor([[1.0, float("nan")]]))
    clf = cl.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), device="cpu")
    with pytest.raises(InputError, match="maps has shape"):
        completeness_error(clf, torch.rand(2, 1, 2, 2), torch.rand(2, 4))
