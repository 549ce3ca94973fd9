"""Keras models (issue 15, item 1): ``.keras`` / ``.h5`` files and ``Classifier.from_keras``.

The seed architecture of the issue (grey input; Conv2D x4, MaxPool, Flatten, Dense, Dropout, Dense
softmax) at 32x32 is built, trained a few steps on seeded data and saved in both formats inside the
tests. The converted torch model is checked against Keras itself: probabilities against
``model.predict``, every attribution method against the wrapped Keras model, Grad-CAM against one
computed by hand from the Keras model's own channels-last activations.
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip(
    "keras", reason="LOUD SKIP: keras is not installed, so the Keras tests cannot run; "
    "install it with pip install 'counterlens[keras]' (make test does)")
if keras.backend.backend() != "torch":   # pragma: no cover - the environment set another backend
    pytest.skip(f"LOUD SKIP: keras runs on {keras.backend.backend()!r}; the Keras tests need KERAS_BACKEND=torch",
                allow_module_level=True)

import counterlens as cl  # noqa: E402
from counterlens.attribution import METHODS, get_method  # noqa: E402
from counterlens.errors import InputError, MethodError, ModelLoadError, UntrustedModelError  # noqa: E402
from counterlens.keras_graph import KerasGraph  # noqa: E402
from counterlens.keras_models import KerasWrapped, import_keras  # noqa: E402
from counterlens.loading import load_model  # noqa: E402
from counterlens.metrics.sanity import randomizable_layers  # noqa: E402

L = keras.layers
CAMS = {name for name, info in METHODS.items() if info.kind == "cam"}
FAST = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2}, "squaregrad": {"samples": 2},
        "vargrad": {"samples": 2}, "rise": {"samples": 16, "cells": 4}, "lime": {"samples": 16, "n_segments": 9},
        "kernel_shap": {"samples": 16, "n_segments": 9}, "occlusion": {"window": 16, "stride": 16}}


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per row of ``[B, ...]`` maps."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def quadrant_images(n: int, size: int = 32, seed: int = 0):
    """Grey ``[n, size, size, 1]`` noise with a bright square in one quadrant (the class, 0..3)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 1), dtype=np.float32) * 0.3
    y = rng.integers(0, 4, n)
    h = size // 2
    for i, c in enumerate(y):
        r, s = (c // 2) * h + 3, (c % 2) * h + 3
        x[i, r:r + h - 6, s:s + h - 6] += 0.7
    return x, y


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory):
    """The issue's seed architecture at 32x32, trained 2 epochs, saved as .keras and .h5."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 1)),
        L.Conv2D(4, 3, activation="relu"), L.Conv2D(4, 3, activation="relu"),
        L.Conv2D(8, 3, activation="relu"), L.Conv2D(8, 3, activation="relu"),
        L.MaxPooling2D(), L.Flatten(), L.Dense(16, activation="relu"), L.Dropout(0.5),
        L.Dense(4, activation="softmax")], name="seed_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    x, y = quadrant_images(96)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    folder = tmp_path_factory.mktemp("keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(folder / "seed.keras")
        model.save(folder / "seed.h5")       # the legacy format, as TF-Keras 2 users have
    return model, folder, quadrant_images(4, seed=1)[0]


# -- loading and numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_seed_model_file_loads_converted_with_keras_probabilities(seed_model, suffix):
    model, folder, x = seed_model
    clf = load_model(folder / f"seed{suffix}", device="cpu")
    assert isinstance(clf.module, torch.nn.Sequential)                 # native torch, no Keras inside
    assert not any(isinstance(m, keras.layers.Layer) for m in clf.module.modules())
    assert clf.in_channels == 1 and clf.input_size == (32, 32) and clf.output == "probabilities"
    assert clf.value_range is None                           # not stated by the model
    assert "converted to torch" in clf.card["architecture"]
    expected = model.predict(x, verbose=0)
    torch.testing.assert_close(clf.probs(nchw(x)), torch.from_numpy(expected), atol=1e-5, rtol=0)
    # explained on the pre-softmax logits: the softmax module is stripped, not applied twice
    assert isinstance(list(clf.module)[-1], torch.nn.Softmax)
    logits = clf.logits(nchw(x))
    torch.testing.assert_close(torch.softmax(logits, 1), torch.from_numpy(expected), atol=1e-5, rtol=0)
    assert float((logits.exp().sum(1) - 1).abs().max()) > 1e-3           # not probabilities


def test_model_as_bytes_in_a_worker(seed_model):
    _, folder, x = seed_model
    clf = cl.load_classifier(cl.pack_model(folder / "seed.keras"), device="cpu")    # written as model.pt
    torch.testing.assert_close(clf.probs(nchw(x)), load_model(folder / "seed.keras", device="cpu").probs(nchw(x)))


def test_every_method_converted_equals_wrapped_keras(seed_model):
    model, _, x = seed_model
    conv = cl.Classifier.from_keras(model, device="cpu")
    wrapped = cl.Classifier.from_keras(model, device="cpu", convert=False)
    assert isinstance(wrapped.module, KerasWrapped) and wrapped.output == "probabilities"
    xt = nchw(x[:2])
    torch.testing.assert_close(wrapped.probs(xt), conv.probs(xt), atol=1e-5, rtol=0)
    for name in METHODS:
        a = cl.explain(conv, xt, methods=[name], seed=0, **{name: FAST.get(name, {})})[name]
        assert a.shape == (2, 32, 32) and torch.isfinite(a).all(), name
        if name in CAMS:
            with pytest.raises(MethodError):       # no torch layer to hook in a wrapped Keras model
                get_method(name).function(wrapped, xt)
            continue
        b = cl.explain(wrapped, xt, methods=[name], seed=0, **{name: FAST.get(name, {})})[name]
        assert float(corr(a, b).min()) >= 0.999, name


def test_gradcam_of_converted_model_equals_hand_computed_keras_gradcam(seed_model):
    """Grad-CAM at the last feature map (max_pooling2d, found by itself) against the same computed
    from the Keras model's own NHWC activations and the Dense head's pre-softmax logits."""
    model, _, x = seed_model
    clf = cl.Classifier.from_keras(model, device="cpu")
    from counterlens.attribution import find_target_layer
    xt = nchw(x)
    assert find_target_layer(clf, xt) == "max_pooling2d"
    ours = get_method("gradcam").function(clf, xt, target=torch.tensor([0, 1, 2, 3]), relu=False)

    probe = keras.Model(model.inputs, [model.get_layer("max_pooling2d").output, model.get_layer("dropout").output])
    acts, hidden = probe(torch.from_numpy(x), training=False)             # acts: [B, h, w, C]
    head = model.layers[-1]
    logits = hidden @ head.kernel.value + head.bias.value
    score = logits[torch.arange(4), torch.tensor([0, 1, 2, 3])].sum()
    grads, = torch.autograd.grad(score, acts)
    weights = grads.mean(dim=(1, 2), keepdim=True)
    cam = (weights * acts).sum(dim=-1).detach()                           # [B, h, w]
    cam = torch.nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours, cam, atol=1e-5, rtol=1e-4)
    # the channels-last mistake the issue describes is not what we compute
    assert float(corr(ours, cam).min()) > 0.999


def test_sanity_randomisation_has_layers_on_converted_not_on_wrapped(seed_model):
    model, _, x = seed_model
    conv = cl.Classifier.from_keras(model, device="cpu")
    layers = randomizable_layers(conv, nchw(x))
    assert layers[0] == "dense_1" and layers[-1] == "conv2d" and len(layers) == 6
    with pytest.raises(MethodError):
        randomizable_layers(cl.Classifier.from_keras(model, device="cpu", convert=False), nchw(x))


# -- other architectures -----------------------------------------------------------------------------
def _residual():
    i = keras.Input((16, 16, 3))
    h = L.Conv2D(6, 3, padding="same", use_bias=False)(i)
    h = L.BatchNormalization()(h)
    h = L.Activation("relu")(h)
    r = L.Conv2D(6, 3, padding="same", activation="relu")(h)
    r = L.Conv2D(6, 3, padding="same")(r)
    h = L.ReLU()(L.Add()([h, r]))
    return keras.Model(i, L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(h)), name="residual")


def _zoo():
    """Architectures beyond the seed: other layers, Functional graphs, 1D/3D, channels_first, heads."""
    yield "residual", _residual(), (16, 16, 3)
    i = keras.Input((17, 15, 2))
    h = L.Resizing(15, 13, interpolation="bilinear")(i)
    h = L.SeparableConv2D(6, 3, padding="same", activation="elu")(L.DepthwiseConv2D(3, depth_multiplier=2)(h))
    a = L.AveragePooling2D(3, strides=2, padding="same")(h)
    m = L.MaxPooling2D(3, strides=2, padding="same")(h)
    h = L.Concatenate()([L.ZeroPadding2D(((1, 0), (0, 1)))(a), L.ZeroPadding2D(((0, 1), (1, 0)))(m)])
    h = L.UpSampling2D(2, interpolation="bilinear")(L.Cropping2D(((1, 0), (0, 1)))(h))
    h = L.PReLU(shared_axes=[1, 2])(L.LeakyReLU(0.1)(L.UpSampling2D(2)(h)))
    g = L.Concatenate()([L.GlobalAveragePooling2D()(h), L.GlobalMaxPooling2D()(h)])
    yield "functional_mix", keras.Model(i, L.Dense(3, activation="softmax")(g)), (17, 15, 2)
    yield "conv1d", keras.Sequential([
        keras.Input((40, 2)), L.Conv1D(4, 5, padding="causal", dilation_rate=2, activation="gelu"),
        L.AveragePooling1D(3, strides=2, padding="same"),      # uneven padding: Keras repeats the edge
        L.Conv1D(4, 4, strides=3, padding="same", activation="swish"), L.MaxPooling1D(2), L.LayerNormalization(),
        L.Flatten(), L.Dense(3, activation="softmax")]), (40, 2)
    yield "conv3d", keras.Sequential([
        keras.Input((8, 9, 10, 1)), L.Conv3D(3, 3, activation="relu"), L.BatchNormalization(), L.AveragePooling3D(2),
        L.Conv3D(4, 2, padding="same", activation="tanh"), L.GlobalAveragePooling3D(), L.Dense(2)]), (8, 9, 10, 1)
    yield "channels_first", keras.Sequential([
        keras.Input((2, 12, 12)), L.Conv2D(4, 3, data_format="channels_first", activation="relu"),
        L.BatchNormalization(axis=1), L.MaxPooling2D(2, data_format="channels_first"),
        L.Flatten(data_format="channels_first"), L.Dense(3, activation="softmax")]), (2, 12, 12)
    yield "mlp_without_channel_axis", keras.Sequential([
        keras.Input((10, 10)), L.Rescaling(1 / 255.0, offset=-0.5), L.Flatten(), L.Dense(8, activation="selu"),
        L.Dense(2, activation="softmax")]), (10, 10)
    inner = keras.Sequential([keras.Input((8, 8, 4)), L.Conv2D(4, 3, padding="same", activation="relu6"),
                              L.ReLU(max_value=3.0, negative_slope=0.1)], name="inner")
    i = keras.Input((12, 12, 1))
    h = inner(L.Cropping2D(1)(L.Reshape((10, 10, 4))(L.Conv2D(4, 3, activation="relu")(i))))
    h = L.Flatten()(L.Dense(5)(L.Permute((3, 1, 2))(h)))
    yield "nested_model_dense_on_maps", keras.Model(i, L.Dense(2, activation="log_softmax")(h)), (12, 12, 1)
    yield "rgb_normalization_groups", keras.Sequential([
        keras.Input((16, 16, 4)), L.Normalization(mean=[0.2, 0.5, 0.1, 0.3], variance=[0.1, 0.4, 2.0, 1.0]),
        L.SpatialDropout2D(0.3), L.Conv2D(8, 3, groups=2, strides=2, activation="hard_sigmoid", use_bias=False),
        L.Conv2D(4, (2, 3), padding="same", activation="mish"), L.Softmax(axis=-1),
        L.GlobalMaxPooling2D(keepdims=True), L.Flatten(), L.Dense(3, activation="softmax")]), (16, 16, 4)


def _perturb_statistics(model, rng):
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n))
            layer.moving_variance.assign(rng.random(n) + 0.5)
            if layer.gamma is not None:
                layer.gamma.assign(rng.random(n) + 0.5)


@pytest.mark.parametrize("name", ["residual", "functional_mix", "conv1d", "conv3d", "channels_first",
                                  "mlp_without_channel_axis", "nested_model_dense_on_maps", "rgb_normalization_groups"])
def test_architectures_convert_to_the_same_function(name):
    keras.utils.set_random_seed(1)
    _, model, shape = next(z for z in _zoo() if z[0] == name)
    rng = np.random.default_rng(0)
    _perturb_statistics(model, rng)
    x = rng.random((3, *shape), dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = cl.Classifier.from_keras(model, device="cpu")
    assert not [w for w in caught if "could not be converted" in str(w.message)]
    assert not isinstance(clf.module, KerasWrapped)
    expected = torch.from_numpy(model.predict(x, verbose=0))
    xt = torch.from_numpy(x)
    if name == "mlp_without_channel_axis":
        xt = xt[:, None]                             # counterlens feeds [B, 1, H, W]
    elif name != "channels_first":
        xt = xt.movedim(-1, 1)
    assert clf.in_channels == (shape[0] if name == "channels_first" else 1 if name.startswith("mlp") else shape[-1])
    out = clf.module(clf.preprocess(xt) if clf.preprocess is not None else xt)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    wrapped = cl.Classifier.from_keras(model, device="cpu", convert=False)
    a, b = (get_method("saliency").function(c, xt) for c in (clf, wrapped))
    assert float(corr(a, b).min()) >= 0.999
    if name == "residual":
        assert isinstance(clf.module, KerasGraph)
        from counterlens.attribution import find_target_layer
        assert find_target_layer(clf, xt) == "re_lu"       # the block's output, after the residual Add
        cam = get_method("gradcam").function(clf, xt)
        assert cam.shape == (3, 16, 16) and torch.isfinite(cam).all()


def test_keras_operations_and_an_application_model_convert():
    """Operations on Keras tensors (``x + 3.0``, ``keras.ops.mean``: not the Add layer) and a
    keras.applications model convert; logits equal Keras' with the softmax taken off the head."""
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    i = keras.Input((16, 16, 3))
    h = L.Conv2D(4, 3, padding="same")(i)
    hard_swish = L.ReLU(6.0)(h + 3.0) * (1 / 6.0) * h                    # MobileNetV3's, as tensor operations
    ops_model = keras.Model(i, L.Dense(3, activation="softmax")(keras.ops.mean(hard_swish - 0.5, axis=(1, 2))))
    mobilenet = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3)
    for model in (ops_model, mobilenet):
        _perturb_statistics(model, rng)
        clf = cl.Classifier.from_keras(model, device="cpu")
        assert not isinstance(clf.module, KerasWrapped) and clf.output == "probabilities"
        x = rng.random((2, *model.inputs[0].shape[1:]), dtype=np.float32) * 2 - 1
        logits = clf.logits(nchw(x)).detach()
        model.layers[-1].activation = keras.activations.linear           # Keras' own pre-softmax logits
        expected = torch.from_numpy(model.predict(x, verbose=0))
        assert float(expected.std()) > 1e-3
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_from_keras_takes_a_path_and_refuses_an_unbuilt_model(seed_model):
    model, folder, x = seed_model
    clf = cl.Classifier.from_keras(str(folder / "seed.h5"), device="cpu", classes=["a", "b", "c", "d"])
    torch.testing.assert_close(clf.probs(nchw(x)), torch.from_numpy(model.predict(x, verbose=0)), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="no known input shape"):
        cl.Classifier.from_keras(keras.Sequential([L.Dense(2)]))
    with pytest.raises(InputError, match="keras.Model"):
        cl.Classifier.from_keras(torch.nn.Linear(2, 2))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Subclassed()
    net(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InputError, match="subclassed model .*Functional or Sequential"):
        cl.Classifier.from_keras(net)


# -- heads -----------------------------------------------------------------------------------------
def test_one_sigmoid_output_is_a_binary_classifier():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((12, 12, 1)), L.Rescaling(1 / 255.0), L.Conv2D(3, 3, activation="relu"),
                              L.Flatten(), L.Dense(1, activation="sigmoid")])
    x = np.random.default_rng(0).random((5, 12, 12, 1), dtype=np.float32) * 255
    clf = cl.Classifier.from_keras(model, device="cpu", classes=["tumour"])
    p = model.predict(x, verbose=0)[:, 0]
    assert clf.output == "sigmoid"
    assert clf.value_range == (0.0, 255.0)                  # Rescaling(1/255) first: it takes 8-bit values
    probs = clf.probs(nchw(x))
    assert probs.shape == (5, 2) and clf.class_names(2) == ["not tumour", "tumour"]
    torch.testing.assert_close(probs[:, 1], torch.from_numpy(p), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs[:, 0], torch.from_numpy(1 - p), atol=1e-5, rtol=0)


def test_several_sigmoids_are_multilabel():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((12, 12, 1)), L.Conv2D(3, 3, activation="relu"),
                              L.GlobalAveragePooling2D(), L.Dense(3, activation="sigmoid")])
    x = np.random.default_rng(0).random((4, 12, 12, 1), dtype=np.float32)
    clf = cl.Classifier.from_keras(model, device="cpu")
    assert clf.output == "multilabel"
    torch.testing.assert_close(clf.probs(nchw(x)), torch.from_numpy(model.predict(x, verbose=0)), atol=1e-5, rtol=0)


def test_softmax_as_an_operation_is_detected_on_the_first_pass():
    keras.utils.set_random_seed(7)
    i = keras.Input((8, 8, 1))
    model = keras.Model(i, keras.ops.softmax(L.Dense(3)(L.Flatten()(L.Conv2D(2, 3)(i)))))
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    for convert in (True, False):
        clf = cl.Classifier.from_keras(model, device="cpu", convert=convert)
        torch.testing.assert_close(clf.probs(nchw(x)), torch.from_numpy(model.predict(x, verbose=0)), atol=1e-5, rtol=0)
        assert clf.output == "probabilities"                     # "auto" found the softmax call
        assert float((clf.logits(nchw(x)).detach().exp().sum(1) - 1).abs().min()) > 1e-2   # explained on logits


# -- what cannot be converted, and what must not load -----------------------------------------------
class Square(L.Layer):
    """A layer counterlens has no converter for."""

    def call(self, x):
        return x * x


def test_unconvertible_layer_falls_back_to_wrapped_keras_with_the_list():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((10, 10, 1)), L.Conv2D(2, 3, activation="relu"), Square(name="square"),
                              L.Flatten(), L.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).random((2, 10, 10, 1), dtype=np.float32)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) could not be converted to torch: square \(Square\).*"
                                         r"gradcam.*model-randomisation"):
        clf = cl.Classifier.from_keras(model, device="cpu")
    assert isinstance(clf.module, KerasWrapped) and clf.module.unconverted == ["square (Square)"]
    assert clf.output == "probabilities"
    torch.testing.assert_close(clf.probs(nchw(x)), torch.from_numpy(model.predict(x, verbose=0)), atol=1e-5, rtol=0)
    with pytest.raises(MethodError):
        get_method("gradcam").function(clf, nchw(x))
    assert torch.isfinite(get_method("saliency").function(clf, nchw(x))).all()


def test_a_conversion_that_does_not_reproduce_keras_is_refused(monkeypatch):
    """The probe after conversion: a converter made wrong on purpose (Dense bias off by one) must
    leave the model wrapped, with the difference in the warning, never explained wrongly."""
    from counterlens import keras_layers

    def off_by_one(layer, cfg, shapes, moved):
        converted = dense(layer, cfg, shapes, moved)
        with torch.no_grad():
            converted.parts[0][1].bias += 1.0
        return converted

    dense = keras_layers.CONVERTERS["Dense"]
    monkeypatch.setitem(keras_layers.CONVERTERS, "Dense", off_by_one)
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3), L.Flatten(), L.Dense(3)])
    with pytest.warns(UserWarning, match=r"conversion to torch was refused: the converted model's output differs"):
        clf = cl.Classifier.from_keras(model, device="cpu")
    assert isinstance(clf.module, KerasWrapped)


def test_lambda_layer_is_refused_without_trust(tmp_path, capsys):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3), L.Lambda(lambda t: t * 2.0, name="double"),
                              L.Flatten(), L.Dense(2, activation="softmax")])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(tmp_path / "lambda.h5")
    for refused in (path, tmp_path / "lambda.h5"):
        with pytest.raises(UntrustedModelError, match="--trust-model-file"):
            load_model(refused, device="cpu")
    from counterlens.cli import main
    (tmp_path / "images").mkdir()
    assert main(["explain", "--model", str(path), "--data", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Lambda" in err[0] and "--trust-model-file" in err[0]
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    with pytest.warns(UserWarning, match=r"double \(Lambda\)"):
        clf = load_model(path, device="cpu", trust_model_file=True)
    torch.testing.assert_close(clf.probs(nchw(x)), torch.from_numpy(model.predict(x, verbose=0)), atol=1e-5, rtol=0)


def test_keras_with_another_backend_or_missing_is_a_clear_error(monkeypatch, tmp_path):
    class Backend:
        @staticmethod
        def backend():
            return "tensorflow"

    class FakeKeras:
        backend = Backend

    monkeypatch.setitem(sys.modules, "keras", FakeKeras)
    with pytest.raises(InputError, match="already imported with the 'tensorflow' backend.*KERAS_BACKEND=torch"):
        import_keras()
    monkeypatch.setitem(sys.modules, "keras", None)            # import keras -> ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'counterlens\[keras\]'"):
        import_keras()


def test_counterlens_imports_without_keras():
    """No module of the package imports keras at import time (only inside functions), read from the
    source as tests/test_layers.py reads imports; so ``import counterlens`` works without keras."""
    import ast
    from pathlib import Path
    src = Path(cl.__file__).resolve().parent
    found = []
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:                          # module level only (functions import lazily)
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
                names = [a.name for a in sub.names] if isinstance(sub, ast.Import) else \
                    [sub.module or ""] if isinstance(sub, ast.ImportFrom) else []
                found += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "keras"]
    assert not found


# -- the command line ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_explain_a_keras_model_end_to_end(seed_model, tmp_path, capsys):
    from PIL import Image

    from counterlens.cli import main
    _, folder, _ = seed_model
    images = tmp_path / "images"
    images.mkdir()
    x, _ = quadrant_images(4, size=48, seed=2)                  # resized to the model's 32x32 by the loader
    for i, img in enumerate(x):
        Image.fromarray((img[..., 0].clip(0, 1) * 255).astype(np.uint8)).save(images / f"case{i}.png")
    run = tmp_path / "run"
    code = main(["explain", "--model", str(folder / "seed.keras"), "--data", str(images), "--out", str(run),
                 "--methods", "gradcam,saliency", "--classes", "a,b,c,d", "--quiet", "--no-report", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    result = cl.open_run(run)
    assert (result.cases.status == "done").sum() == 4 and len(result.attributions) == 8
    for path in result.cases.path:
        assert result.map(path, "gradcam").shape == (32, 32)


@pytest.mark.slow
def test_conversion_benchmark_smoke(tmp_path, capsys):
    """benchmarks/keras_conversion.py at tiny settings (no timing asserted): both models agree."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "keras_conversion", Path(__file__).resolve().parents[1] / "benchmarks" / "keras_conversion.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "16", "--batches", "2", "--repeats", "1", "--json", str(out)]) == 0
    import json
    row, = json.loads(out.read_text())["rows"]
    assert row["wrapped_ms"] > 0 and row["converted_ms"] > 0 and row["speedup"] > 0
    assert row["max_prob_diff"] < 1e-5 and row["saliency_corr"] > 0.999
    assert "| 16x16 x2 |" in capsys.readouterr().out
