"""Gradient x input, guided backprop, deconvnet and IG extras against independent references.

References: Captum (GuidedBackprop, Deconvolution, InputXGradient, IntegratedGradients) on models
whose ReLUs are nn.ReLU modules (Captum hooks only those); a hand-replaced model, written here
with its own autograd Functions, on a model with functional and in-place ReLUs; closed forms.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
)
from conftest import TinyCNN
from torch import nn

import counterlens as cl
from counterlens.attribution.gradients import (
    deconvnet,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
)
from counterlens.attribution.relu_rules import relu_rule
from counterlens.errors import InputError


def corr(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def whole(clf):
    """preprocess + module as one nn.Module, the form Captum's module-hooking methods need."""
    return nn.Sequential(clf.preprocess, clf.module).eval()


class ModuleReLUs(nn.Module):
    """Every ReLU an nn.ReLU module, not in place: what Captum's hooks see completely."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


class MixedReLUs(nn.Module):
    """Functional, in-place (return value ignored), module and Tensor-method ReLUs, and a residual.

    ``hand``: None runs the ReLUs as written; an autograd Function replaces every one of them
    explicitly (the hand-replaced reference).
    """

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8 * 8 * 8, 20), nn.Linear(20, 12), nn.Linear(12, 3)
        self.hand = None

    def forward(self, x):
        r = self.hand.apply if self.hand is not None else None
        h = F.relu(self.conv1(x)) if r is None else r(self.conv1(x))
        h = self.conv2(h)
        if r is None:
            torch.relu_(h)                         # in place; the return value is ignored
        else:
            h = r(h)
        h = F.max_pool2d(h, 2)
        h = self.act(self.conv3(h)) if r is None else r(self.conv3(h))
        h = (h + self.conv4(h)).relu() if r is None else r(h + self.conv4(h))
        v = self.fc1(h.flatten(1))
        if r is None:
            v.relu_()                              # in place; the return value is ignored
        else:
            v = r(v)
        v = F.relu(self.fc2(v), inplace=True) if r is None else r(self.fc2(v))
        return self.fc3(v)


class HandGuided(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where((x > 0) & (g > 0), g, torch.zeros_like(g))


class HandDeconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


@pytest.fixture
def clf(tiny_cnn):
    return cl.Classifier(tiny_cnn, preprocess=cl.Normalize([0.5], [0.25]), classes=["a", "b", "c"], device="cpu")


@pytest.mark.parametrize("ours, theirs", [(guided_backprop, GuidedBackprop), (deconvnet, Deconvolution)])
def test_relu_rules_match_captum_on_module_relus(clf, ours, theirs):
    """TinyCNN (in-place nn.ReLU modules) and a 3-channel model with plain nn.ReLU modules."""
    torch.manual_seed(2)
    rgb = cl.Classifier(ModuleReLUs(), preprocess=cl.Normalize([0.4] * 3, [0.3] * 3), device="cpu")
    for model, x, target in ((clf, torch.rand(5, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1])),
                             (rgb, torch.rand(4, 3, 16, 16), torch.tensor([3, 0, 1, 2]))):
        a = ours(model, x, target, batch_size=3)
        with pytest.warns(UserWarning, match="hooks"):
            b = theirs(whole(model)).attribute(x.clone().requires_grad_(True), target=target).sum(dim=1).detach()
        assert a.shape == x.shape[:1] + x.shape[2:]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert corr(a, b) >= 0.999


@pytest.mark.parametrize("ours, hand", [(guided_backprop, HandGuided), (deconvnet, HandDeconv)])
def test_relu_rules_on_functional_and_inplace_relus_equal_hand_replaced_model(ours, hand):
    torch.manual_seed(3)
    net = MixedReLUs().eval()
    model = cl.Classifier(net, device="cpu")
    x, target = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 1])
    a = ours(model, x, target, batch_size=3)
    net.hand = hand
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xr).gather(1, target[:, None]).sum(), xr)
    net.hand = None
    torch.testing.assert_close(a, g.sum(dim=1), rtol=1e-5, atol=1e-7)
    # the rule really changed something, and Captum (module hooks only) cannot see these ReLUs
    assert not torch.allclose(a, saliency(model, x, target, absolute=False), atol=1e-4)
    captum_cls = GuidedBackprop if ours is guided_backprop else Deconvolution
    with pytest.warns(UserWarning):
        c = captum_cls(net).attribute(x.clone().requires_grad_(True), target=target).sum(dim=1).detach()
    assert not torch.allclose(a, c, atol=1e-4)


def test_relu_rule_keeps_forward_values_and_cleans_up():
    torch.manual_seed(4)
    net = MixedReLUs().eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        plain = net(x)
        for rule in ("guided", "deconvnet"):
            with relu_rule(rule) as mode:
                ruled = net(x)
            assert mode.calls == 6 and torch.equal(plain, ruled)
    h = torch.randn(5)
    with relu_rule("guided"):
        out = h.relu_()
    assert out is h and (h >= 0).all()
    with pytest.raises(RuntimeError, match="boom"), relu_rule("deconvnet"):
        raise RuntimeError("boom")
    assert not torch.overrides._get_current_function_mode_stack()
    with pytest.raises(InputError, match="guided"), relu_rule("nope"):
        pass


def test_relu_rule_warns_when_the_model_has_no_relu():
    clf = cl.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), device="cpu")
    x = torch.rand(2, 2, 4, 4)
    with pytest.warns(UserWarning, match="no ReLU"):
        a = guided_backprop(clf, x, 1)
    torch.testing.assert_close(a, saliency(clf, x, 1, absolute=False))


def test_input_x_gradient_matches_captum_and_closed_form(clf):
    x, target = torch.rand(4, 1, 32, 32), torch.tensor([2, 1, 0, 2])
    a = input_x_gradient(clf, x, target, batch_size=3)
    b = InputXGradient(whole(clf)).attribute(x.clone().requires_grad_(True), target=target).sum(dim=1).detach()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    xl = torch.rand(3, 3, 5, 5)
    expected = (lin[1].weight[1].view(3, 5, 5) * xl).sum(1).detach()
    torch.testing.assert_close(input_x_gradient(cl.Classifier(lin, device="cpu"), xl, 1), expected)


@pytest.mark.parametrize("method", [input_x_gradient, guided_backprop, deconvnet])
def test_batch_size_invariance_and_other_dimensions(method):
    torch.manual_seed(5)
    clf3 = cl.Classifier(TinyCNN(size=8, dims=3), device="cpu")
    x3 = torch.rand(3, 1, 8, 8, 8)
    a, b = method(clf3, x3, "predicted", batch_size=1), method(clf3, x3, "predicted", batch_size=100)
    assert a.shape == (3, 8, 8, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    net1 = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 10, 2))
    out = method(cl.Classifier(net1, device="cpu"), torch.rand(2, 3, 10), 1)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_integrated_gradients_user_tensor_baselines_match_captum(clf):
    x, target = torch.rand(3, 1, 32, 32), torch.tensor([1, 2, 0])
    forward = whole(clf)
    for baseline in (torch.rand(3, 1, 32, 32), torch.rand(1, 1, 32, 32), torch.full((1, 1, 1, 1), 0.3)):
        ours = integrated_gradients(clf, x, target, steps=24, baseline=baseline, batch_size=17)
        theirs = IntegratedGradients(forward).attribute(
            x, baselines=baseline.expand_as(x), target=target, n_steps=24, method="gausslegendre")
        torch.testing.assert_close(ours, theirs.sum(dim=1).detach(), rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="broadcast"):
        integrated_gradients(clf, x, target, steps=4, baseline=torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre",
                                  "riemann_trapezoid"])
def test_integrated_gradients_rules_match_captum(clf, rule):
    """Same points and weights as Captum, except riemann_trapezoid.

    Captum's trapezoid weights are 1/n (halved at the ends), summing to (n-1)/n; ours are the
    trapezoid rule on linspace(0, 1, n), 1/(n-1), summing to 1. So ours = Captum * n / (n-1).
    """
    x, target, steps = torch.rand(3, 1, 32, 32), torch.tensor([0, 2, 1]), 20
    ours = integrated_gradients(clf, x, target, steps=steps, rule=rule, baseline=0.1, batch_size=13)
    theirs = IntegratedGradients(whole(clf)).attribute(
        x, baselines=0.1, target=target, n_steps=steps, method=rule).sum(dim=1).detach()
    if rule == "riemann_trapezoid":
        theirs = theirs * steps / (steps - 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert corr(ours, theirs) >= 0.999
