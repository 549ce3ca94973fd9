"""Counterfactual analysis and figures: difference maps, layer activation changes, attribution of
the difference (completeness), and the case / grid figures (2D grey, RGB, 3D)."""
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from counterlens import Classifier, Normalize
from counterlens.counterfactual.analysis import (activation_changes, attribute_difference, difference_map,
                                                 format_activation_changes)
from counterlens.errors import InputError, TargetError
from counterlens.viz.counterfactual_plots import counterfactual_figure, counterfactual_grid
from counterlens.viz.plots import figure_png


@dataclasses.dataclass
class StandInResult:
    """The fields of CounterfactualResult that analysis and figures read."""
    x: torch.Tensor
    x_orig: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor
    probs_before: torch.Tensor
    probs_after: torch.Tensor
    distance: dict
    reason: list


def make_result(x_orig, x_cf, target, valid, probs_before, probs_after):
    d = (x_cf - x_orig).flatten(1)
    fields = {"x": x_cf, "x_orig": x_orig, "target": torch.as_tensor(target), "valid": torch.as_tensor(valid),
              "probs_before": probs_before, "probs_after": probs_after,
              "distance": {"l1": d.abs().sum(1), "l2": d.norm(dim=1)},
              "reason": ["" if v else "target not reached in 500 steps at the smallest lambda 1e-3"
                         for v in torch.as_tensor(valid).tolist()]}
    try:   # the real result type when it exists and takes these fields
        from counterlens.counterfactual.result import CounterfactualResult
        return CounterfactualResult(**fields, lam=torch.ones(len(x_cf)),
                                    iterations=torch.zeros(len(x_cf), dtype=torch.long))
    except (ImportError, TypeError, ValueError):
        return StandInResult(**fields)


def _probs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, k, generator=g), dim=1)


# -- difference map -------------------------------------------------------------------------------
def test_difference_map_is_the_signed_channel_sum():
    x = torch.rand(2, 3, 5, 6)
    x_cf = x.clone()
    x_cf[0, 0, 1, 2] += 0.5
    x_cf[0, 2, 1, 2] -= 0.2
    x_cf[1, 1, 4, 5] -= 0.3
    expected = torch.zeros(2, 5, 6)
    expected[0, 1, 2] = 0.3
    expected[1, 4, 5] = -0.3
    torch.testing.assert_close(difference_map(x, x_cf), expected, atol=1e-6, rtol=0)
    res = make_result(x, x_cf, [1, 0], [True, False], _probs(2, 2, 0), _probs(2, 2, 1))
    torch.testing.assert_close(difference_map(res), expected, atol=1e-6, rtol=0)
    vol = torch.rand(1, 1, 4, 5, 6)
    assert difference_map(vol, vol + 1).shape == (1, 4, 5, 6)
    with pytest.raises(InputError, match="x_cf"):
        difference_map(x, x_cf[:1])


# -- activation changes ---------------------------------------------------------------------------
def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_activation_changes_match_a_hand_computation(tiny_cnn):
    clf = Classifier(tiny_cnn, preprocess=Normalize([0.5], [0.5]), device="cpu", value_range=(0, 1))
    tiny_cnn.train()
    tiny_cnn.features[0].weight.requires_grad_(False)
    modes = [m.training for m in tiny_cnn.modules()]
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 32, 32, generator=g)
    x_cf = (x + 0.2 * torch.randn(5, 1, 32, 32, generator=g)).clamp(0, 1)

    changes = activation_changes(clf, x, x_cf, top=3, batch_size=2)     # three chunks
    names = [c["name"] for c in changes]
    assert names == ["features.0", "features.1", "features.2", "features.3", "features.4",
                     "classifier.0", "classifier.1", "classifier.2"]      # execution order, leaves
    conv = tiny_cnn.features[0]
    with torch.no_grad():
        a, a_cf = conv((x - 0.5) / 0.5), conv((x_cf - 0.5) / 0.5)     # preprocess, then the first conv
    delta = a_cf - a
    first = changes[0]
    assert first["module"] == "Conv2d" and first["shape"] == (8, 32, 32)
    assert first["mean_abs_change"] == pytest.approx(delta.abs().mean().item(), rel=1e-5)
    assert first["relative_change"] == pytest.approx((delta.norm() / a.norm()).item(), rel=1e-5)
    np.testing.assert_allclose(first["mean_abs_change_per_row"], delta.abs().flatten(1).mean(1).numpy(),
                               rtol=1e-5)
    per_channel = delta.abs().mean(dim=(0, 2, 3))
    values, idx = per_channel.topk(3)
    assert [i for i, _ in first["top_channels"]] == idx.tolist()
    np.testing.assert_allclose([v for _, v in first["top_channels"]], values.numpy(), rtol=1e-5)
    # the in-place ReLU after it: relu of the conv output, not corrupted by the in-place op
    relu_delta = a_cf.relu() - a.relu()
    assert changes[1]["mean_abs_change"] == pytest.approx(relu_delta.abs().mean().item(), rel=1e-5)
    assert changes[-1]["top_channels"] == [] and changes[-1]["shape"] == (3,)
    assert "features.0" in format_activation_changes(changes)

    # the model is left as found: modes, flags, no hooks
    assert [m.training for m in tiny_cnn.modules()] == modes
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
    assert _hooks(tiny_cnn) == 0 and all(p.grad is None for p in tiny_cnn.parameters())


def test_activation_changes_zero_for_identical_inputs_named_layers_and_errors(tiny_cnn):
    clf = Classifier(tiny_cnn, device="cpu")
    x = torch.rand(3, 1, 32, 32)
    changes = activation_changes(clf, x, x.clone())
    assert all(c["mean_abs_change"] == 0 and c["relative_change"] == 0 for c in changes)
    res = make_result(x, x.clone(), [0, 1, 2], [True] * 3, _probs(3, 3, 0), _probs(3, 3, 1))
    named = activation_changes(clf, res, layers=["features", "classifier.2"])
    assert [c["name"] for c in named] == ["features", "classifier.2"]
    with pytest.raises(InputError, match="layers"):
        activation_changes(clf, x, x, layers=["nope"])
    with pytest.raises(InputError, match="top"):
        activation_changes(clf, x, x, top=-1)
    # an error inside the forward pass (wrong input size) still removes the hooks
    small = torch.rand(2, 1, 16, 16)
    with pytest.raises(RuntimeError):
        activation_changes(clf, small, small)
    assert _hooks(tiny_cnn) == 0


def test_activation_changes_reports_every_call_of_a_reused_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            z = self.act(self.conv(x))
            z = self.act(z - 0.1)
            return self.head(z.mean(dim=(2, 3)))

    clf = Classifier(Shared(), device="cpu")
    x = torch.rand(2, 1, 8, 8)
    names = [c["name"] for c in activation_changes(clf, x, x + 0.1)]
    assert names == ["conv", "act", "act (call 2)", "head"]


# -- attribution of the difference ----------------------------------------------------------------
def test_attribute_difference_is_complete_and_zero_outside_the_edit(tiny_cnn):
    clf = Classifier(tiny_cnn, preprocess=Normalize([0.5], [0.5]), device="cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 32, 32, generator=g)
    x_cf = x.clone()
    x_cf[:, :, 8:20, 10:22] = (x_cf[:, :, 8:20, 10:22] + 0.5 * torch.rand(3, 1, 12, 12, generator=g)).clamp(0, 1)
    target = torch.tensor([0, 1, 2])
    attr, delta = attribute_difference(clf, x, x_cf, target, steps=128, return_delta=True)
    assert attr.shape == (3, 32, 32)
    with torch.no_grad():
        change = clf.logits(x_cf).gather(1, target[:, None])[:, 0] - clf.logits(x).gather(1, target[:, None])[:, 0]
    total = attr.flatten(1).sum(1)
    assert (total - change).abs().max() <= 0.01 * change.abs().max()
    torch.testing.assert_close(delta, total - change, atol=1e-4, rtol=1e-4)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:20, 10:22] = False
    assert (attr[:, outside] == 0).all()
    # from a result: its target is used
    res = make_result(x, x_cf, target, [True] * 3, _probs(3, 3, 0), _probs(3, 3, 1))
    torch.testing.assert_close(attribute_difference(clf, res, steps=128), attr)
    with pytest.raises(TargetError, match="target"):
        attribute_difference(clf, x, x_cf)


# -- figures --------------------------------------------------------------------------------------
def _diff_clim(ax):
    return ax.images[-1].get_clim()


@pytest.mark.parametrize("shape", [(1, 24, 24), (3, 20, 28), (1, 6, 16, 16)], ids=["grey", "rgb", "3d"])
def test_figures_render_with_symmetric_difference_and_shared_display_range(shape, tmp_path):
    g = torch.Generator().manual_seed(3)
    n = 3
    x = 0.2 + 0.1 * torch.rand(n, *shape, generator=g)
    x_cf = x.clone()
    spot = (slice(None), slice(None)) + tuple(slice(s // 3, s // 3 + 3) for s in shape[1:])
    x_cf[spot] += 0.5                                  # a brighter patch
    x_cf[(slice(None), slice(None)) + tuple(slice(0, 2) for _ in shape[1:])] -= 0.15   # a darker corner
    classes = ["normal", "pneumonia", "other"]
    res = make_result(x, x_cf, torch.tensor([0, 0, 2]), torch.tensor([True, True, False]),
                      _probs(n, 3, 4), _probs(n, 3, 5))

    fig = counterfactual_figure(res, 0, classes)
    lo, hi = _diff_clim(fig.axes[2])
    assert lo == -hi and hi > 0
    # original and counterfactual share the display range: an unchanged pixel shows the same grey
    a0, a1 = (np.asarray(fig.axes[i].images[0].get_array()) for i in (0, 1))
    px = (a0.shape[0] - 1, a0.shape[1] - 1)
    np.testing.assert_allclose(a0[px], a1[px])
    # correct polarity: the brightened patch is the brightest region of the counterfactual panel
    grey1 = a1 if a1.ndim == 2 else a1.mean(-1)
    assert grey1.max() > grey1[px] + 0.3
    png = figure_png(fig)
    assert Image.open(io.BytesIO(png)).size[0] > 600

    grid = counterfactual_grid(res, classes, max_rows=2)
    diff_axes = [ax for ax in grid.axes if ax.images and ax.images[-1].get_cmap().name == "RdBu_r"]
    assert len(diff_axes) == 2
    for ax in diff_axes:
        lo, hi = _diff_clim(ax)
        assert lo == -hi and hi > 0
    assert figure_png(grid).startswith(b"\x89PNG")


def test_figure_arguments_are_checked():
    x = torch.rand(2, 1, 8, 8)
    res = make_result(x, x + 0.1, [1, 0], [True, False], _probs(2, 2, 0), _probs(2, 2, 1))
    with pytest.raises(InputError, match="index"):
        counterfactual_figure(res, 5, ["a", "b"])
    with pytest.raises(InputError, match="classes"):
        counterfactual_figure(res, 0, ["a", "b", "c"])
    with pytest.raises(InputError, match="max_rows"):
        counterfactual_grid(res, ["a", "b"], max_rows=0)
    # no change at all still draws (limits fall back to +-1)
    same = make_result(x, x.clone(), [1, 0], [False, False], _probs(2, 2, 0), _probs(2, 2, 0))
    fig = counterfactual_figure(same, 1)
    assert _diff_clim(fig.axes[2]) == (-1.0, 1.0)
    figure_png(fig)
