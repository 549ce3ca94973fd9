"""First attribution methods against independent references: Captum and the IG axiom."""
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from conftest import TinyCNN

import counterlens as cl
from counterlens.attribution import find_target_layer, gradcam, integrated_gradients, saliency
from counterlens.errors import CounterlensError, MethodError, TargetError


def corr(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.fixture
def clf(tiny_cnn):
    return cl.Classifier(tiny_cnn, preprocess=cl.Normalize([0.5], [0.25]), classes=["a", "b", "c"], device="cpu")


def captum_forward(clf):
    return lambda z: clf.module(clf.preprocess(z))


def test_gradcam_matches_captum_layergradcam(clf):
    x = torch.rand(6, 1, 32, 32)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    ours = gradcam(clf, x, target, batch_size=4)
    layer_name = find_target_layer(clf, x)
    assert layer_name == "features.4"
    layer = dict(clf.module.named_modules())[layer_name]
    clf.module.eval()
    theirs = LayerGradCam(captum_forward(clf), layer).attribute(x, target=target, relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, (32, 32), interpolate_mode="bilinear")[:, 0].detach()
    assert ours.shape == (6, 32, 32)
    for i in range(6):
        if theirs[i].abs().sum() > 0:
            assert corr(ours[i], theirs[i]) >= 0.999
        else:
            assert ours[i].abs().sum() == 0


def test_integrated_gradients_matches_captum(clf):
    x = torch.rand(3, 1, 32, 32)
    target = torch.tensor([2, 0, 1])
    ours = integrated_gradients(clf, x, target, steps=32, batch_size=20)
    clf.module.eval()
    theirs = IntegratedGradients(captum_forward(clf)).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=32, method="gausslegendre")
    torch.testing.assert_close(ours, theirs.sum(dim=1).detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_completeness(clf, rule):
    """Sum of attributions equals f(x) - f(baseline) within 1% relative at enough steps."""
    torch.manual_seed(1)
    x = torch.rand(4, 1, 32, 32)
    target = torch.tensor([0, 1, 2, 1])
    for baseline in ("zeros", "blur", 0.5):
        attr, delta = integrated_gradients(clf, x, target, steps=1024, rule=rule, baseline=baseline,
                                           return_delta=True, batch_size=512)
        base = cl.attribution.gradients.make_baseline(x, baseline)
        with torch.no_grad():
            gap = (clf.logits(x) - clf.logits(base)).gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(attr.flatten(1).sum(1), gap, rtol=0.01, atol=1e-4)
        torch.testing.assert_close(delta, attr.flatten(1).sum(1) - gap, rtol=1e-3, atol=1e-5)


def test_integrated_gradients_linear_closed_form():
    """For f(x) = w.x + b, IG from zeros is exactly w * x."""
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 5, 2))
    clf = cl.Classifier(lin, device="cpu")
    x = torch.rand(3, 2, 5, 5)
    attr = integrated_gradients(clf, x, 1, steps=4)
    expected = (lin[1].weight[1].view(2, 5, 5) * x).sum(1).detach()
    torch.testing.assert_close(attr, expected, rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_results(clf):
    x = torch.rand(5, 1, 32, 32)
    a = integrated_gradients(clf, x, "predicted", steps=16, batch_size=7)
    b = integrated_gradients(clf, x, "predicted", steps=16, batch_size=80)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradcam(clf, x, 1, batch_size=2), gradcam(clf, x, 1, batch_size=5))


def test_3d_input_and_target_layer():
    torch.manual_seed(0)
    net = TinyCNN(size=8, dims=3)
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(2, 1, 8, 8, 8)
    maps = cl.explain(clf, x, methods=["gradcam", "integrated_gradients", "saliency"],
                      integrated_gradients__steps=8)
    for m in maps.values():
        assert m.shape == (2, 8, 8, 8)
        assert torch.isfinite(m).all()


def test_explain_targets_and_errors(clf):
    x = torch.rand(2, 1, 32, 32)
    by_name = cl.explain(clf, x, target="b", methods=["saliency"])["saliency"]
    by_index = saliency(clf, x, 1)
    torch.testing.assert_close(by_name, by_index)
    with pytest.raises(TargetError, match="classes"):
        cl.explain(clf, x, target="zebra", methods=["saliency"])
    with pytest.raises(TargetError, match="out of range"):
        saliency(clf, x, 7)
    with pytest.raises(MethodError, match="available"):
        cl.explain(clf, x, methods=["nonsense"])
    with pytest.raises(MethodError, match="steps"):
        cl.explain(clf, x, methods=["integrated_gradients"], integrated_gradients__stpes=3)
    with pytest.raises(CounterlensError, match="NaN"):
        saliency(clf, torch.full((1, 1, 32, 32), float("nan")), 0)
    with pytest.raises(CounterlensError, match="batch"):
        saliency(clf, torch.rand(32, 32), 0)


def test_model_left_as_found(clf):
    net = clf.module
    net.train()
    net.features[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(3, 1, 32, 32)
    cl.explain(clf, x, methods=["gradcam", "integrated_gradients", "saliency"], integrated_gradients__steps=4)
    assert net.training and all(m.training for m in net.modules())
    assert not net.features[0].weight.requires_grad and net.features[3].weight.requires_grad
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    assert net.features[0].weight.grad is None


def test_hooks_removed_when_method_raises(clf):
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(CounterlensError):
        gradcam(clf, x, 0, layer="no.such.layer")
    bad_layer = clf.module.classifier[0]   # Flatten: its output is not spatial but is a tensor
    clf.module.train()

    def boom(*_):
        raise RuntimeError("model failed half-way")
    handle = clf.module.classifier[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="half-way"):
        gradcam(clf, x, 0)
    handle.remove()
    assert clf.module.training
    assert all(not m._forward_hooks for m in clf.module.modules())
    assert bad_layer is clf.module.classifier[0]
