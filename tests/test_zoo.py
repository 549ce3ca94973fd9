"""Every registered method on a zoo of awkward models: the model is left exactly as found.

In-place ReLU, functional ReLU, one ReLU module used twice, BatchNorm + Dropout, a residual block,
a model handed over in train mode, frozen parameters. After each call (and after a call that fails
half-way): no hooks left, the same train/eval flags, the same requires_grad flags, bitwise the same
parameters and buffers (BatchNorm running statistics included), no .grad written, grad mode and
torch-function modes as before.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import counterlens as cl
from counterlens.attribution import METHODS

FAST = {"steps": 4, "samples": 6, "window": 8, "stride": 8, "n_segments": 8, "cell": 8}


def fast_params(name):
    defaults = METHODS[name].defaults()
    return {k: v for k, v in FAST.items() if k in defaults}


class InplaceReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.act1, self.act2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = F.max_pool2d(self.act1(self.conv1(x)), 2)
        return self.fc(self.act2(self.conv2(x)).flatten(1))


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1).relu())


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = F.max_pool2d(self.relu(self.conv1(x)), 2)
        return self.fc(self.relu(self.conv2(x)).flatten(1))


class BatchNormDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(6 * 8 * 8, 3))

    def forward(self, x):
        return self.head(self.features(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                   nn.Conv2d(6, 6, 3, padding=1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.block(h))
        return self.fc(h.mean(dim=(2, 3)))


def make(kind):
    torch.manual_seed(0)
    net = {"inplace_relu": InplaceReLU, "functional_relu": FunctionalReLU, "shared_relu": SharedReLU,
           "batchnorm_dropout": BatchNormDropout, "residual": Residual, "train_mode": BatchNormDropout,
           "frozen": InplaceReLU}[kind]()
    # give BatchNorm non-trivial running statistics, then hand the model over in the wanted state
    with torch.no_grad():
        net.train()
        net(torch.rand(8, 1, 16, 16))
    net.eval()
    if kind == "train_mode":
        net.train()
    if kind == "frozen":
        for p in net.parameters():
            p.requires_grad_(False)
    return net


ZOO = ["inplace_relu", "functional_relu", "shared_relu", "batchnorm_dropout", "residual", "train_mode", "frozen"]


def snapshot(net):
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "training": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "grads": [p.grad for p in net.parameters()],
        "grad_enabled": torch.is_grad_enabled(),
        "modules": [id(m) for m in net.modules()],
    }


def assert_as_found(net, before):
    for m in net.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{type(m).__name__} keeps {attr}"
    after = snapshot(net)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"])
    assert after["grad_enabled"] == before["grad_enabled"]
    assert after["modules"] == before["modules"]
    for k, v in before["state"].items():
        assert torch.equal(net.state_dict()[k], v), f"{k} changed"
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ZOO)
def test_model_left_as_found(method, kind):
    net = make(kind)
    clf = cl.Classifier(net, classes=["a", "b", "c"], device="cpu")
    before = snapshot(net)
    x = torch.rand(2, 1, 16, 16)
    out = cl.explain(clf, x, target=torch.tensor([0, 2]), methods=[method], batch_size=5,
                     **{method: fast_params(method)})[method]
    assert out.shape == (2, 16, 16) and torch.isfinite(out).all()
    assert_as_found(net, before)


class FailsOnCall(nn.Module):
    """Wraps a model; raises on the n-th forward call (after hooks were installed)."""

    def __init__(self, inner, n):
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("model failed half-way")
        return self.inner(x)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_model_left_as_found_after_failure(method):
    net = FailsOnCall(make("batchnorm_dropout"), n=3)
    net.train()
    clf = cl.Classifier(net, classes=["a", "b", "c"], device="cpu")
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="half-way"):
        cl.explain(clf, torch.rand(3, 1, 16, 16), target=1, methods=[method], batch_size=1,
                   **{method: fast_params(method)})
    net.calls = -10**9   # no more failures for the snapshot comparison
    assert_as_found(net, before)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_seed_same_output(method):
    clf = cl.Classifier(make("residual"), device="cpu")
    x = torch.rand(2, 1, 16, 16)
    a = cl.explain(clf, x, methods=[method], seed=3, **{method: fast_params(method)})[method]
    b = cl.explain(clf, x, methods=[method], seed=3, **{method: fast_params(method)})[method]
    assert torch.equal(a, b)
