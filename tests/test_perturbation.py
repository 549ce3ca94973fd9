"""Occlusion against Captum at equal settings; RISE against a naive loop over its own masks and a
model whose answer is known (the score is the mean of one region)."""
import pytest
import torch
from captum.attr import Occlusion
from conftest import TinyCNN
from torch import nn

import counterlens as cl
from counterlens.attribution.base import METHODS
from counterlens.attribution.perturbation import occlusion, rise, rise_masks
from counterlens.errors import InputError


def make_clf(in_channels=1, dims=2, size=32):
    torch.manual_seed(0)
    return cl.Classifier(TinyCNN(in_channels=in_channels, size=size, dims=dims), device="cpu")


def captum_occlusion(clf, x, target, window, stride, baseline=0.0, forward=None):
    clf.module.eval()
    c = x.shape[1]
    attr = Occlusion(forward or clf.module).attribute(
        x, sliding_window_shapes=(c, *window), strides=(c, *stride), baselines=baseline, target=target,
        perturbations_per_eval=64)
    assert torch.equal(attr, attr[:, :1].expand_as(attr))      # windows span channels: all equal
    return attr[:, 0]


def test_registered():
    assert METHODS["occlusion"].kind == "perturbation" and METHODS["rise"].kind == "perturbation"
    assert METHODS["rise"].defaults()["samples"] == 2000


@pytest.mark.parametrize("window,stride,baseline", [((5, 7), (3, 4), 0.0), ((8, 8), (4, 4), 0.3),
                                                    ((32, 3), (1, 2), 0.0), ((3, 3), (3, 3), -1.0)])
def test_occlusion_equals_captum_rgb(window, stride, baseline):
    clf = make_clf(in_channels=3)
    x = torch.rand(3, 3, 32, 32)
    target = torch.tensor([0, 1, 2])
    ours = occlusion(clf, x, target, window=window, stride=stride, baseline=baseline, batch_size=17)
    theirs = captum_occlusion(clf, x, target, window, stride, baseline)
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_occlusion_prob_output_and_tensor_baseline_equal_captum():
    clf = make_clf()
    x = torch.rand(2, 1, 32, 32)
    base = torch.rand(2, 1, 32, 32)
    target = torch.tensor([2, 0])
    ours = occlusion(clf, x, target, window=6, stride=3, baseline=base, output="prob")
    theirs = captum_occlusion(clf, x, target, (6, 6), (3, 3), base,
                              forward=lambda z: torch.softmax(clf.module(z), dim=1))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_occlusion_default_window_and_mean_baseline():
    clf = make_clf()
    x = torch.rand(2, 1, 32, 32)
    ours = occlusion(clf, x, 1, baseline="mean")                   # window 4, stride 2
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(ours, captum_occlusion(clf, x, 1, (4, 4), (2, 2), mean), rtol=1e-5, atol=1e-6)


def test_occlusion_3d_and_1d_equal_captum():
    clf = make_clf(dims=3, size=8)
    x = torch.rand(2, 1, 8, 8, 8)
    ours = occlusion(clf, x, 1, window=(3, 4, 2), stride=(2, 2, 2), batch_size=50)
    assert ours.shape == (2, 8, 8, 8)
    torch.testing.assert_close(ours, captum_occlusion(clf, x, 1, (3, 4, 2), (2, 2, 2)), rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 18, 3))
    clf1 = cl.Classifier(net, device="cpu")
    x1 = torch.rand(3, 2, 20)
    ours = occlusion(clf1, x1, 0, window=5, stride=2)
    assert ours.shape == (3, 20)
    torch.testing.assert_close(ours, captum_occlusion(clf1, x1, 0, (5,), (2,)), rtol=1e-5, atol=1e-6)


def test_occlusion_batch_size_invariant_and_model_left_in_train_mode():
    clf = make_clf()
    clf.module.train()
    x = torch.rand(3, 1, 32, 32)
    a = occlusion(clf, x, 0, window=8, stride=4, batch_size=3)
    b = occlusion(clf, x, 0, window=8, stride=4, batch_size=1000)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert clf.module.training and all(m.training for m in clf.module.modules())
    assert all(p.requires_grad for p in clf.module.parameters())


def test_occlusion_errors():
    clf = make_clf()
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(InputError, match="window"):
        occlusion(clf, x, 0, window=40)
    with pytest.raises(InputError, match="stride"):
        occlusion(clf, x, 0, window=4, stride=6)
    with pytest.raises(InputError, match="window"):
        occlusion(clf, x, 0, window=(4, 4, 4))
    with pytest.raises(InputError, match="baseline"):
        occlusion(clf, x, 0, baseline="median")


# -- RISE -----------------------------------------------------------------------------------------
def test_rise_masks_are_smooth_random_and_seeded():
    m = rise_masks((32, 32), samples=400, cells=8, p_keep=0.5, seed=3)
    assert m.shape == (400, 32, 32) and m.min() >= 0 and m.max() <= 1
    assert abs(m.mean().item() - 0.5) < 0.02
    assert torch.equal(m, rise_masks((32, 32), samples=400, cells=8, p_keep=0.5, seed=3))
    assert not torch.equal(m, rise_masks((32, 32), samples=400, cells=8, p_keep=0.5, seed=4))
    # smooth: neighbouring pixels differ by at most one cell's linear ramp (cell = 4 px -> 1/4.5)
    assert (m[:, 1:] - m[:, :-1]).abs().max() <= 1 / 4.5 + 1e-6
    assert abs(rise_masks((32,), samples=2000, p_keep=0.3).mean().item() - 0.3) < 0.02
    assert rise_masks((6, 10, 12), samples=3, cells=(2, 3, 4)).shape == (3, 6, 10, 12)


@pytest.mark.parametrize("output", ["prob", "logit"])
def test_rise_equals_naive_loop_over_its_masks(output):
    clf = make_clf()
    x = torch.rand(3, 1, 32, 32)
    target = torch.tensor([0, 2, 1])
    ours = rise(clf, x, target, samples=96, cells=4, p_keep=0.4, baseline=0.2, output=output, seed=5, batch_size=40)
    masks = rise_masks((32, 32), samples=96, cells=4, p_keep=0.4, seed=5)
    clf.module.eval()
    expected = torch.zeros(3, 32, 32)
    with torch.no_grad():
        for n in range(96):
            for i in range(3):
                xm = x[i:i + 1] * masks[n] + 0.2 * (1 - masks[n])
                logits = clf.module(xm)
                s = torch.softmax(logits, 1) if output == "prob" else logits
                expected[i] += s[0, target[i]] * masks[n]
    torch.testing.assert_close(ours, expected / (96 * 0.4), rtol=1e-4, atol=1e-6)


class RegionMean(nn.Module):
    """Class 0 scores the mean of a region, class 1 the mean of everything else."""

    def __init__(self, region):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x):
        r = self.region
        inside = (x * r).flatten(1).sum(1) / r.sum()
        outside = (x * (1 - r)).flatten(1).sum(1) / (1 - r).sum()
        return torch.stack([inside, outside], dim=1)


@pytest.mark.parametrize("shape,cells", [((32, 32), 8), ((24, 24, 24), 6)])
def test_rise_concentrates_on_the_region_the_score_reads(shape, cells):
    """With x = 1, the map is E[f(M) M_i] / p for f = mean of M over R. A pixel more than 3 cells
    away from R shares no grid cell with R, so it is independent of f and its value is E[f] = p
    (0.5: linear interpolation keeps the mean); a pixel in R adds its (positive) covariance with f,
    so the top pixels lie in R."""
    region, far = torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)
    region[tuple(slice(n // 12, n // 12 + n // 3) for n in shape)] = True       # 2 cells wide
    far[tuple(slice(0, n // 12 + n // 3 + 3 * n // cells) for n in shape)] = False
    clf = cl.Classifier(RegionMean(region), device="cpu")
    x = torch.ones(2, 1, *shape)
    maps = rise(clf, x, 0, samples=2000, cells=cells, output="logit", batch_size=500)
    assert maps.shape == (2, *shape)
    k = int(region.sum()) // 8
    top = maps[0].flatten().topk(k).indices
    assert region.flatten()[top].all()
    assert far.sum() > 0 and abs(maps[0][far].mean().item() - 0.5) < 0.02
    assert maps[0][region].mean() > maps[0][far].mean() + 0.02


def test_rise_deterministic_batch_invariant_3d():
    clf = make_clf(dims=3, size=8)
    x = torch.rand(2, 1, 8, 8, 8)
    a = rise(clf, x, 1, samples=60, cells=4, batch_size=7, seed=1)
    assert a.shape == (2, 8, 8, 8)
    torch.testing.assert_close(a, rise(clf, x, 1, samples=60, cells=4, batch_size=1000, seed=1), rtol=1e-5, atol=1e-7)
    assert torch.equal(a, rise(clf, x, 1, samples=60, cells=4, batch_size=7, seed=1))
    assert not torch.equal(a, rise(clf, x, 1, samples=60, cells=4, batch_size=7, seed=2))


def test_rise_errors():
    clf = make_clf()
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(InputError, match="p_keep"):
        rise(clf, x, 0, p_keep=0.0)
    with pytest.raises(InputError, match="samples"):
        rise(clf, x, 0, samples=0)
    with pytest.raises(InputError, match="cells"):
        rise(clf, x, 0, cells=(4, 4, 4))
