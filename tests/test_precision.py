"""Half precision: bf16 / fp16 models and autocast give float32 maps that rank like float32's.

One small CNN trained on sklearn's digits (upsampled to 16x16) is explained four ways besides
float32: the module cast to bfloat16 and to float16, and the float32 module under
``Classifier(precision="bf16" | "fp16")`` (autocast). Every one of the 17 methods must give finite
float32 maps whose mean Spearman rank correlation with the float32 maps (same seed for the random
methods) is above the floor stated below, measured on this CPU (see benchmarks/precision.py) and
set a margin under what was measured.
"""
import copy

import pytest
import torch
from torch import nn

import counterlens as cl
from counterlens.attribution import METHODS
from counterlens.errors import InputError
from counterlens.metrics.sanity import spearman

from conftest import fit_digits, single_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

# floors of the mean Spearman correlation with the float32 maps (4 images); measured with bf16 /
# fp16 at 16x16: saliency 0.991 / 0.9996, input_x_gradient 0.996 / 0.998, guided_backprop 0.998 /
# 0.999, deconvnet 0.998 / 0.9999, integrated_gradients 0.983 / 0.999, the gradient CAMs 1.0 / 1.0,
# scorecam 0.987 / 1.0, guided_gradcam 0.994 / 0.997, smoothgrad 0.997 / 0.9996, squaregrad 0.998 /
# 0.9997, vargrad 0.993 / 0.9995, occlusion 0.993 / 0.998, rise 0.9999 / 1.0, lime 1.0 / 1.0,
# kernel_shap 0.999 / 1.0. bf16 keeps 8 bits of mantissa, fp16 11: fp16 is closer everywhere.
FLOOR_BF16 = {"saliency": 0.97, "input_x_gradient": 0.97, "guided_backprop": 0.98, "deconvnet": 0.98,
              "integrated_gradients": 0.96, "gradcam": 0.99, "gradcam_plus_plus": 0.99, "layercam": 0.99,
              "scorecam": 0.95, "guided_gradcam": 0.97, "smoothgrad": 0.98, "squaregrad": 0.98, "vargrad": 0.97,
              "occlusion": 0.97, "rise": 0.99, "lime": 0.99, "kernel_shap": 0.98}
FLOOR_FP16 = 0.98

PARAMS = {"integrated_gradients": {"steps": 16}, "smoothgrad": {"samples": 8}, "squaregrad": {"samples": 8},
          "vargrad": {"samples": 8}, "rise": {"samples": 200},
          "lime": {"samples": 200, "segmentation": "grid", "n_segments": 16},
          "kernel_shap": {"samples": 200, "segmentation": "grid", "n_segments": 16}}


def _digits_cnn(size=16, epochs=10):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = nn.functional.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, size=(size, size),
                                  mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return fit_digits(net, x[:1400], y[:1400], epochs, lr=5e-3), x[1400:1404]


@pytest.fixture(scope="module")
def setup():
    net, x = _digits_cnn()
    clfs = {"float32": cl.Classifier(net, device="cpu"),
            "bf16_model": cl.Classifier(copy.deepcopy(net).to(torch.bfloat16), device="cpu"),
            "fp16_model": cl.Classifier(copy.deepcopy(net).to(torch.float16), device="cpu"),
            "autocast_bf16": cl.Classifier(net, device="cpu", precision="bf16"),
            "autocast_fp16": cl.Classifier(net, device="cpu", precision="fp16")}
    target = clfs["float32"].predict(x)
    reference = {m: METHODS[m].function(clfs["float32"], x, target, **PARAMS.get(m, {})) for m in METHODS}
    return clfs, x, target, reference


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_in_half_precision_ranks_like_float32(setup, method):
    clfs, x, target, reference = setup
    assert len(METHODS) == 17
    ref = reference[method]
    assert ref.flatten(1).std(1).min() > 0, "the float32 maps must not be constant for the comparison to mean anything"
    for way, clf in clfs.items():
        if way == "float32":
            continue
        out = METHODS[method].function(clf, x, target, **PARAMS.get(method, {}))
        assert out.dtype == torch.float32 and out.shape == ref.shape, (way, out.dtype, out.shape)
        assert torch.isfinite(out).all(), way
        rho = float(torch.nanmean(spearman(ref, out)))
        floor = FLOOR_BF16[method] if "bf16" in way else FLOOR_FP16
        assert rho >= floor, f"{method} {way}: Spearman {rho:.4f} with float32 < {floor}"


def test_half_models_are_left_as_found_and_logits_are_float32(setup):
    clfs, x, _, _ = setup
    for way in ("bf16_model", "autocast_bf16"):
        clf = clfs[way]
        before = {k: (v.dtype, v.clone()) for k, v in clf.module.state_dict().items()}
        logits = clf.logits(x)
        assert logits.dtype == torch.float32
        METHODS["gradcam"].function(clf, x, "predicted")
        after = clf.module.state_dict()
        assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())
    # the half-precision logits are those of the float32 logits within bf16's rounding
    ref = clfs["float32"].logits(x).detach()
    assert torch.allclose(clfs["bf16_model"].logits(x).detach(), ref, atol=0.05 * float(ref.abs().max()))


def test_counterfactual_search_in_half_precision_decides_in_float32(setup):
    clfs, x, _, _ = setup
    for way in ("bf16_model", "autocast_bf16", "autocast_fp16"):
        clf = clfs[way]
        res = cl.counterfactual(clf, x, "other")
        assert res.x.dtype == torch.float32 and res.probs_after.dtype == torch.float32
        assert bool(res.valid.any()), way
        # validity as the float32 probabilities of the returned images say it
        again = clf.probs(res.x)
        assert torch.equal(res.valid, again.argmax(1) == res.target), way


def test_precision_argument_is_checked():
    with pytest.raises(InputError, match="precision='int8'"):
        cl.Classifier(nn.Linear(2, 2), device="cpu", precision="int8")
    assert cl.Classifier(nn.Linear(2, 2), device="cpu", precision="bfloat16").precision == "bf16"
    assert cl.Classifier(nn.Linear(2, 2), device="cpu", precision=None).precision is None


def test_precision_benchmark_smoke(tmp_path):
    """benchmarks/precision.py at tiny settings: every way runs and the table names the device."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "precision.py"
    spec = importlib.util.spec_from_file_location("precision_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(size=16, images=2, epochs=1, repeats=1, quick=True, methods=["saliency", "gradcam"])
    for name in ("saliency", "gradcam"):
        for way in bench.WAYS:
            row = results[name][way]
            assert row["error"] is None and row["finite"] and row["dtype"] == "float32" and row["speed_ratio"] > 0
    assert "| saliency |" in bench.markdown(results, "CPU")
