"""The Classifier wrapper: preprocessing in the wrapper, modes given back, clear errors."""
import pytest
import torch
from torch import nn

import counterlens as cl
from counterlens.errors import InputError
from counterlens.model import preprocess_from_spec, preprocess_to_spec


class RGBNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.9)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        assert x.shape[1] == 3
        return self.head(self.drop(self.conv(x).mean(dim=(2, 3))))


def test_preprocessing_inside_wrapper_grey_to_rgb_and_normalize():
    net = RGBNet()
    clf = cl.Classifier(net, preprocess=cl.Normalize([0.5, 0.4, 0.3], [0.2, 0.2, 0.2]), in_channels=3, device="cpu")
    x = torch.rand(2, 1, 8, 8)
    net.eval()
    expected = net((x.expand(-1, 3, -1, -1) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2)
    torch.testing.assert_close(clf.logits(x), expected)
    # gradients flow to the data-space input, through the preprocessing
    xg = x.clone().requires_grad_(True)
    clf.logits(xg)[:, 0].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_eval_during_call_and_mode_given_back():
    net = RGBNet()
    net.train()
    net.head.eval()    # a mixed state must come back exactly
    clf = cl.Classifier(net, in_channels=3, device="cpu")
    x = torch.rand(4, 1, 8, 8)
    a, b = clf.logits(x), clf.logits(x)
    torch.testing.assert_close(a, b)   # dropout off during the call
    assert net.training and net.conv.training and not net.head.training
    probs = clf.probs(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    assert clf.predict(x).dtype == torch.long


def test_mode_given_back_when_the_model_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")
    net = Boom().train()
    clf = cl.Classifier(net, device="cpu")
    with pytest.raises(RuntimeError):
        clf.logits(torch.rand(1, 1, 4, 4))
    assert net.training


def test_preprocess_spec_round_trip():
    pre = nn.Sequential(cl.RepeatChannels(3), cl.Normalize([0.1, 0.2, 0.3], [1, 2, 3]))
    spec = preprocess_to_spec(pre)
    assert spec == [{"repeat_channels": 3}, {"normalize": {"mean": pytest.approx([0.1, 0.2, 0.3]), "std": [1, 2, 3]}}]
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(preprocess_from_spec(spec)(x), pre(x))


def test_wrapper_errors_name_the_fix():
    clf = cl.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), classes=["a", "b", "c"], device="cpu")
    with pytest.raises(InputError, match="batch"):
        clf.logits(torch.rand(4, 4))
    with pytest.raises(InputError, match="NaN"):
        clf.logits(torch.full((1, 1, 4, 4), float("inf")))
    with pytest.raises(InputError, match="one name per output"):
        clf.class_names(2)
    with pytest.raises(InputError, match="std"):
        cl.Normalize([0.5], [0.0])
    with pytest.raises(InputError, match="device"):
        cl.Classifier(nn.Linear(2, 2), device="tpu-9000")


def test_device_auto_picks_cpu_without_gpu():
    clf = cl.Classifier(nn.Linear(2, 2))
    assert clf.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


class _Heads(torch.nn.Module):
    """A tiny model whose output form is chosen: logits, one sigmoid logit, a tuple, a dict, NaN."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = torch.nn.Linear(4, 1 if kind == "one" else 3)

    def forward(self, x):
        z = self.lin(x.flatten(1))
        if self.kind == "tuple":
            return x.flatten(1), z                  # (features, logits)
        if self.kind == "dict":
            return {"features": x.flatten(1), "logits": z}
        if self.kind == "nan":
            return z * float("nan")
        return z


def test_output_heads_are_resolved_explicitly():
    x = torch.rand(5, 1, 2, 2)
    one = cl.Classifier(_Heads("one"), device="cpu", classes=["pneumonia"])
    z = one.module(x)
    torch.testing.assert_close(one.probs(x)[:, 1], torch.sigmoid(z[:, 0]))       # one logit: a sigmoid classifier
    assert one.class_names(2) == ["not pneumonia", "pneumonia"]
    maps = cl.explain(one, x, target=0, methods=["saliency"])["saliency"]
    assert maps.abs().sum() > 0                                                     # both classes have gradients
    with pytest.raises(InputError, match="logits_output=INDEX"):
        cl.Classifier(_Heads("tuple"), device="cpu").logits(x)                     # not guessed: features are 4 wide
    named = cl.Classifier(_Heads("tuple"), device="cpu", logits_output=1)
    assert named.logits(x).shape == (5, 3)
    assert cl.Classifier(_Heads("dict"), device="cpu").logits(x).shape == (5, 3)
    with pytest.raises(InputError, match="not one of the model's outputs"):
        cl.Classifier(_Heads("tuple"), device="cpu", logits_output=5).logits(x)
    with pytest.raises(InputError, match="NaN or infinite logits for 5 of 5"):
        cl.Classifier(_Heads("nan"), device="cpu").logits(x)
