"""Model-parameter randomisation (Adebayo et al. 2018) on a CNN trained here on sklearn's digits:
gradients and Grad-CAM change when the weights are destroyed, guided backprop keeps its picture;
the original model is left exactly as found; the similarity measures against scipy / scikit-image."""
import numpy as np
import pytest
import torch
from conftest import digits_cnn, fit_digits, single_thread
from torch import nn

import counterlens as cl
from counterlens.errors import InputError
from counterlens.metrics.sanity import (
    model_randomisation,
    randomizable_layers,
    randomize_,
    sanity_report,
    spearman,
    ssim,
)

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def trained(digits):
    """conv 16 - ReLU - conv 32 - ReLU - maxpool - dense, 6 epochs of Adam on 1437 digits (~2 s)."""
    x, y, xt, yt = digits
    torch.manual_seed(0)
    net = fit_digits(digits_cnn(), x, y, epochs=6)
    clf = cl.Classifier(net, device="cpu")
    assert float((clf.predict(xt) == yt).float().mean()) > 0.93
    return clf, xt[:16]


def test_gradcam_says_why_its_maps_are_empty_on_a_flatten_head(trained):
    # this CNN ends in flatten + dense: Grad-CAM's mean-gradient channel weights give a map that is
    # negative everywhere for most digits (Captum's LayerGradCam agrees), which the ReLU zeroes
    from captum.attr import LayerGradCam

    from counterlens.attribution.cam import find_target_layer, gradcam, layercam
    clf, x = trained
    name = find_target_layer(clf, x)
    assert name == "4"                                  # the max-pool output, the last spatial map
    pred = clf.predict(x)
    ref = LayerGradCam(clf.module, dict(clf.module.named_modules())[name]).attribute(x, target=pred,
                                                                                   relu_attributions=False)
    negative = int((ref.detach().flatten(1).amax(dim=1) <= 0).sum())
    assert negative >= 8
    with pytest.warns(UserWarning, match=f"{negative} of {len(x)} class activation maps are zero"):
        maps = gradcam(clf, x)
    assert int((maps.flatten(1).amax(dim=1) == 0).sum()) == negative
    assert bool((layercam(clf, x).flatten(1).amax(dim=1) > 0).all())    # element-wise weights keep them


def test_gradients_and_gradcam_pass_guided_backprop_fails(trained):
    clf, x = trained
    results = {name: model_randomisation(clf, x, name, params=params, with_ssim=True)
               for name, params in (("saliency", {}), ("gradcam", {"layer": "3"}), ("guided_backprop", {}))}
    for name, r in results.items():
        print(f"\n{name}: layers {r.layers} spearman|.| {[round(v, 3) for v in r.similarity]} "
              f"ssim {[round(v, 3) for v in r.ssim]} random-logit {r.random_logit:.3f} passed {r.passed}")
    sal, cam, gbp = results["saliency"], results["gradcam"], results["guided_backprop"]
    assert sal.layers == cam.layers == gbp.layers == ["6", "2", "0"]         # top layer first
    assert sal.passed and cam.passed and not gbp.passed
    assert max(sal.similarity) < 0.35 and max(cam.similarity) < 0.35
    assert gbp.similarity[0] > 0.6 and np.mean(gbp.similarity) > 0.5      # survives the top layers
    assert all(g > s for g, s in zip(gbp.similarity, sal.similarity))
    assert cam.random_logit < 0.2 < gbp.random_logit                      # class sensitivity
    assert sal.maps_computed == 5 and sal.per_image.shape == (3, 16)
    j = sal.to_json()
    assert set(j) >= {"layers", "similarity", "passed", "threshold", "random_logit"} and j["threshold"] == 0.5


def test_original_model_is_left_untouched(trained):
    clf, x = trained
    net = clf.module
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [(m.training, tuple(p.requires_grad for p in m.parameters(recurse=False))) for m in net.modules()]
    reference = cl.explain(clf, x[:4], methods=["saliency"])["saliency"]
    r = model_randomisation(clf, x[:4], "saliency")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(m.training, tuple(p.requires_grad for p in m.parameters(recurse=False))) for m in net.modules()]
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())
    assert torch.equal(reference, cl.explain(clf, x[:4], methods=["saliency"])["saliency"])
    # deterministic for a seed; a different seed draws other weights
    again = model_randomisation(clf, x[:4], "saliency")
    assert again.similarity == r.similarity
    assert model_randomisation(clf, x[:4], "saliency", seed=1).similarity != r.similarity


def test_layers_in_forward_order_and_randomize_in_place():
    class Reordered(nn.Module):                 # registered in another order than called
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.bn = nn.BatchNorm1d(8)
            self.body = nn.Linear(4, 8)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.body(x.flatten(1)))))

    clf = cl.Classifier(Reordered(), device="cpu")
    assert randomizable_layers(clf, torch.rand(2, 1, 4)) == ["head", "bn", "body"]
    layer = nn.Linear(5, 5)
    w = layer.weight.clone()
    randomize_(layer, seed=0)
    assert not torch.equal(w, layer.weight)
    other = nn.Linear(5, 5)
    randomize_(other, seed=0)
    assert torch.equal(other.weight, layer.weight)
    with pytest.raises(InputError, match="layers="):
        model_randomisation(clf, torch.rand(2, 1, 4), "saliency", layers=["nowhere"])


def test_spearman_against_scipy_and_ssim_against_skimage():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 10, 12))
    b = a + rng.standard_normal((3, 10, 12))
    b[0, :5] = 0.0                                    # ties
    got = spearman(torch.from_numpy(a), torch.from_numpy(b))
    want = [spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    const = spearman(torch.from_numpy(a), torch.zeros(3, 10, 12))
    assert (const == 0).all() and torch.isnan(spearman(torch.zeros(1, 5), torch.rand(1, 5))).all()
    s = ssim(torch.from_numpy(a), torch.from_numpy(b))
    for i in range(3):
        na = (a[i] - a[i].min()) / (a[i].max() - a[i].min())
        nb = (b[i] - b[i].min()) / (b[i].max() - b[i].min())
        ref = structural_similarity(na, nb, win_size=7, data_range=1.0, use_sample_covariance=False)
        assert s[i].item() == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert torch.allclose(ssim(torch.from_numpy(a), torch.from_numpy(a)), torch.ones(3, dtype=torch.float64))


def test_sanity_report_records_a_method_that_cannot_run():
    """An MLP has no spatial layer for Grad-CAM: that entry says why, saliency still runs."""
    torch.manual_seed(0)
    clf = cl.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), device="cpu")
    x = torch.rand(3, 1, 6)
    report = sanity_report(clf, {"saliency": (x, 0), "gradcam": (x, 0), "my_own": (x, 0)})
    assert set(report) == {"saliency", "gradcam"}
    assert report["gradcam"]["passed"] is None and "spatial" in report["gradcam"]["error"]
    assert report["saliency"]["layers"] == ["3", "1"] and len(report["saliency"]["similarity"]) == 2
