"""CAM methods against independent references.

Grad-CAM++, Layer-CAM and Score-CAM against naive per-image loops written here from the papers'
formulas (hooks + torch.autograd.grad, one image and one channel at a time); Grad-CAM and Guided
Grad-CAM against Captum at equal settings; the target layer found for 1D, 2D, 3D, in-place,
residual, BatchNorm and functional models; batch-size invariance; the model left as found.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from conftest import TinyCNN
from torch import nn

import counterlens as cl
from counterlens.attribution import cam as cam_module
from counterlens.attribution.cam import find_target_layer, gradcam, gradcam_plus_plus, layercam, scorecam
from counterlens.errors import InputError

CAMS = {"gradcam": gradcam, "gradcam_plus_plus": gradcam_plus_plus, "layercam": layercam,
        "scorecam": scorecam, "guided_gradcam": cam_module.guided_gradcam}


def corr(a, b):
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


@pytest.fixture
def clf(tiny_cnn):
    return cl.Classifier(tiny_cnn, preprocess=cl.Normalize([0.5], [0.25]), classes=["a", "b", "c"], device="cpu")


def full_model(clf):
    return nn.Sequential(clf.preprocess, clf.module).eval()


# -- naive references: one image (and one channel) at a time --------------------------------------
def act_and_grad(clf, x1, t, layer):
    """A [K, *s] and dS/dA of the target logit for one image, by a hook and torch.autograd.grad."""
    store = {}

    def hook(_m, _i, out):
        store["a"] = out
        return out.clone()      # later in-place ops must not change A
    handle = layer.register_forward_hook(hook)
    try:
        with clf.eval_mode(), torch.enable_grad():
            logit = clf.forward(x1[None].clone().requires_grad_(True))[0, t]
        (g,) = torch.autograd.grad(logit, store["a"])
    finally:
        handle.remove()
    return store["a"][0].detach().double(), g[0].double()


def naive_cam(clf, x, targets, layer, kind):
    maps = []
    for i in range(x.shape[0]):
        a, g = act_and_grad(clf, x[i], int(targets[i]), layer)
        cam = torch.zeros(a.shape[1:], dtype=torch.float64)
        for k in range(a.shape[0]):
            if kind == "layercam":
                cam += torch.relu(g[k]) * a[k]
            elif kind == "gradcam":
                cam += g[k].mean() * a[k]
            else:   # Grad-CAM++ closed form, Chattopadhay et al. eq. 19
                num, den = g[k] ** 2, 2 * g[k] ** 2 + a[k].sum() * g[k] ** 3
                alpha = torch.where(den == 0, torch.zeros_like(num), num / den)
                cam += (alpha * torch.relu(g[k])).sum() * a[k]
        maps.append(torch.relu(cam))
    cams = torch.stack(maps).float()[:, None]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[cams.dim() - 2]
    return F.interpolate(cams, size=x.shape[2:], mode=mode, align_corners=False)[:, 0]


def naive_scorecam(clf, x, targets, layer, baseline):
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]

    def up(m):
        return F.interpolate(m[None, None], size=x.shape[2:], mode=mode, align_corners=False)[0, 0]
    maps = []
    with torch.no_grad(), clf.eval_mode():
        for i in range(x.shape[0]):
            t = int(targets[i])
            a, _ = act_and_grad(clf, x[i], t, layer)
            base = torch.full_like(x[i], baseline)
            p_base = torch.softmax(clf.forward(base[None]), 1)[0, t]
            cam = torch.zeros(a.shape[1:], dtype=torch.float64)
            for k in range(a.shape[0]):
                m = up(a[k].float())
                mask = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
                p = torch.softmax(clf.forward((base + mask * (x[i] - base))[None]), 1)[0, t]
                cam += float(p - p_base) * a[k]
            maps.append(torch.relu(cam).float())
    return torch.stack([up(m) for m in maps])


# -- agreement ------------------------------------------------------------------------------------
# features.0 is a conv followed by an in-place ReLU (its captured output must stay pre-ReLU);
# features.1 is that in-place ReLU. Grad-CAM++ is not run at features.0: with negative activations
# its closed-form denominator 2 G^2 + sum(A) G^3 comes within 0.5% of 0 there and float32 rounding
# is amplified 200-fold (the formula assumes post-ReLU activations).
@pytest.mark.parametrize("kind, method, layer", [
    (kind, method, layer) for kind, method in [("gradcam", gradcam), ("plusplus", gradcam_plus_plus),
                                               ("layercam", layercam)]
    for layer in [None, "features.3", "features.1", "features.0"] if (kind, layer) != ("plusplus", "features.0")])
def test_gradient_cams_match_naive_reference(clf, kind, method, layer):
    torch.manual_seed(1)
    x = torch.rand(4, 1, 32, 32)
    targets = torch.tensor([0, 1, 2, 1])
    module = dict(clf.module.named_modules())[layer or "features.4"]
    ours = method(clf, x, targets, layer=layer, batch_size=3)
    ref = naive_cam(clf, x, targets, module, kind)
    assert ours.shape == (4, 32, 32) and ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("baseline", [0.0, 0.5])
def test_scorecam_matches_naive_reference(clf, baseline):
    with torch.no_grad():    # one dead channel: a constant map, which must get mask 0 (weight 0)
        clf.module.features[3].bias[0] = -100.0
    torch.manual_seed(2)
    x = torch.rand(3, 1, 32, 32)
    targets = torch.tensor([2, 0, 1])
    ours = scorecam(clf, x, targets, baseline="zeros" if baseline == 0 else baseline, batch_size=7)
    ref = naive_scorecam(clf, x, targets, clf.module.features[4], baseline)
    assert ref.abs().sum() > 0 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_gradcam_plus_plus_zero_gradients_are_finite(clf):
    with torch.no_grad():
        clf.module.features[3].bias[:8] = -100.0     # half the channels dead: G = 0, A = 0 there
    out = gradcam_plus_plus(clf, torch.rand(2, 1, 32, 32), 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("interpolation, captum_mode", [("nearest", "nearest"), ("linear", "bilinear")])
def test_guided_gradcam_matches_captum(clf, interpolation, captum_mode):
    x = torch.rand(4, 1, 32, 32)
    targets = torch.tensor([0, 1, 2, 0])
    ours = cam_module.guided_gradcam(clf, x, targets, interpolation=interpolation, batch_size=3)
    theirs = GuidedGradCam(full_model(clf), clf.module.features[4]).attribute(
        x, target=targets, interpolate_mode=captum_mode).sum(dim=1).detach()
    assert ours.shape == (4, 32, 32)
    for i in range(4):
        if theirs[i].abs().sum() > 0:
            assert corr(ours[i], theirs[i]) >= 0.999
        else:
            assert ours[i].abs().sum() == 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_gradcam_3d_matches_captum():
    torch.manual_seed(0)
    net = TinyCNN(size=8, dims=3)
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(3, 1, 8, 8, 8)
    targets = torch.tensor([0, 1, 2])
    ours = gradcam(clf, x, targets, batch_size=2)
    net.eval()
    theirs = LayerGradCam(net, net.features[4]).attribute(x, target=targets, relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, (8, 8, 8), interpolate_mode="trilinear")[:, 0].detach()
    assert ours.shape == (3, 8, 8, 8)
    for i in range(3):
        if theirs[i].abs().sum() > 0:
            assert corr(ours[i], theirs[i]) >= 0.999
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


# -- the target layer -----------------------------------------------------------------------------
class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                                      nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """torchvision style: in-place add, one in-place ReLU module used twice."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class FunctionalBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv(x))


class ResNetLike(nn.Module):
    def __init__(self, block=BasicBlock):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.layer = nn.Sequential(block(6), block(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.layer(self.stem(x))).flatten(1))


class FunctionalBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x)) * 2
        return self.fc(x.flatten(1))


def _ready(net, shape):
    with torch.no_grad():     # non-trivial BatchNorm statistics
        net.train()
        net(torch.rand(4, *shape))
    return net.eval()


@pytest.mark.parametrize("make, shape, expected", [
    (lambda: TinyCNN(), (1, 1, 32, 32), "features.4"),
    (lambda: TinyCNN(size=8, dims=3), (1, 1, 8, 8, 8), "features.4"),
    (Conv1dNet, (1, 2, 16), "features.5"),                           # in-place ReLU after BatchNorm
    (ResNetLike, (1, 1, 16, 16), "layer.1"),                         # the block, not its reused ReLU
    (lambda: ResNetLike(FunctionalBlock), (1, 1, 16, 16), "layer.1"),
    (FunctionalBetween, (1, 1, 16, 16), "conv2"),                    # last module before functional code
])
def test_find_target_layer(make, shape, expected):
    torch.manual_seed(0)
    net = _ready(make(), shape[1:])
    clf = cl.Classifier(net, device="cpu")
    assert find_target_layer(clf, torch.rand(*shape)) == expected


@pytest.mark.parametrize("block", [BasicBlock, FunctionalBlock])
def test_gradcam_on_residual_block_matches_captum(block):
    """The found layer's output is captured after the in-place add and ReLU (as Captum sees it)."""
    torch.manual_seed(0)
    net = _ready(ResNetLike(block), (1, 16, 16))
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(3, 1, 16, 16)
    targets = torch.tensor([0, 1, 2])
    ours = gradcam(clf, x, targets)
    theirs = LayerGradCam(net, net.layer[1]).attribute(x, target=targets, relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, (16, 16), interpolate_mode="bilinear")[:, 0].detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_named_layer_and_errors(clf):
    x = torch.rand(2, 1, 32, 32)
    named = gradcam_plus_plus(clf, x, 1, layer="features.4")
    torch.testing.assert_close(named, gradcam_plus_plus(clf, x, 1))
    assert not torch.equal(layercam(clf, x, 1, layer="features.0"), layercam(clf, x, 1))
    for method in CAMS.values():
        with pytest.raises(InputError, match="layer='features.9'"):
            method(clf, x, 0, layer="features.9")
    with pytest.raises(InputError, match="interpolation"):
        cam_module.guided_gradcam(clf, x, 0, interpolation="cubic")


# -- shapes, batching, determinism, the model left as found ---------------------------------------
@pytest.mark.parametrize("name", sorted(CAMS))
@pytest.mark.parametrize("make, shape", [(Conv1dNet, (3, 2, 16)), (lambda: TinyCNN(size=16), (3, 1, 16, 16)),
                                         (lambda: TinyCNN(size=8, dims=3), (3, 1, 8, 8, 8))])
def test_shapes_batch_size_and_determinism(name, make, shape):
    torch.manual_seed(0)
    clf = cl.Classifier(make(), device="cpu")
    x = torch.rand(*shape)
    small = CAMS[name](clf, x, "predicted", batch_size=2)
    large = CAMS[name](clf, x, "predicted", batch_size=1000)
    assert small.shape == (shape[0], *shape[2:]) and torch.isfinite(small).all()
    # score-CAM weights are differences of probabilities: float32 rounding that depends on the
    # batch (the conv kernels chosen) is not cancelled there, so its tolerance is wider
    tol = 1e-4 if name == "scorecam" else 1e-6
    torch.testing.assert_close(small, large, rtol=1e-5, atol=tol * float(large.abs().max()))
    assert torch.equal(large, CAMS[name](clf, x, "predicted", batch_size=1000))


class FailsOnCall(nn.Module):
    def __init__(self, inner, n):
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("model failed half-way")
        return self.inner(x)


# call 1: targets, 2: the layer probe, 3-4: hooked chunks; score-CAM's masked inputs from call 5,
# guided Grad-CAM's guided backprop (inside its torch-function mode) at calls 7-8
@pytest.mark.parametrize("name, fail_at", [(n, k) for n in sorted(CAMS) for k in (2, 4)]
                         + [("scorecam", 10), ("guided_gradcam", 6)])
def test_hooks_removed_and_mode_kept_after_error(name, fail_at):
    torch.manual_seed(0)
    net = FailsOnCall(TinyCNN(size=16), fail_at)
    net.train()
    clf = cl.Classifier(net, device="cpu")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="half-way"):
        CAMS[name](clf, torch.rand(2, 1, 16, 16), 1, batch_size=1)
    assert all(m.training for m in net.modules())
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.is_grad_enabled() and not torch.overrides._get_current_function_mode_stack()
