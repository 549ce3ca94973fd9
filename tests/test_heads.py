"""Output heads (logits, softmax, one sigmoid, multi-label) against independent references.

References: the same network without its final activation (maps must be identical: the head is
stripped, not re-squashed), the module's own outputs (probabilities), closed forms (the sigmoid's
two classes, IG completeness on a finding's logit), Captum's IG on the finding's logit, and a
multi-label model of region means whose minimal counterfactual edit is known.
"""
import warnings

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

import counterlens as cl
from counterlens.attribution.base import Evaluator, expand_targets, resolve_targets, target_score
from counterlens.cards import read_model_card, save_model_card
from counterlens.errors import InputError, ModelLoadError, TargetError
from counterlens.loading import load_model
from counterlens.metrics.counterfactual import im1

FINDINGS = ["opacity", "effusion", "cardiomegaly", "nodule"]
METHODS = ["saliency", "integrated_gradients", "gradcam"]


def build_net(k: int = 3, seed: int = 0) -> nn.Sequential:
    """A small CNN ending in a Linear layer of ``k`` outputs (the logits)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, k))


def build_multilabel(k: int = 4) -> nn.Sequential:
    """Factory of the card round trip: a multi-label CNN (one sigmoid per finding)."""
    return nn.Sequential(build_net(k, seed=3), nn.Sigmoid())


class FunctionalSoftmax(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


class Regions(nn.Module):
    """Finding k = sigmoid(8 (mean of x over region k - 0.5)): opacity the left half, effusion the
    right half, cardiomegaly the top half (overlaps opacity), nodule the bottom-right quarter."""

    def __init__(self):
        super().__init__()
        m = torch.zeros(4, 1, 8, 8)
        m[0, :, :, :4] = 1
        m[1, :, :, 4:] = 1
        m[2, :, :4, :] = 1
        m[3, :, 4:, 4:] = 1
        self.register_buffer("m", m)

    def logits(self, x):
        return 8 * ((x[:, None] * self.m).sum((2, 3, 4)) / self.m.sum((1, 2, 3)) - 0.5)

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


def images(n=3, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# -- softmax heads: explained on the logits ----------------------------------------------------------
@pytest.mark.parametrize("head", ["softmax", "log_softmax", "functional"])
def test_softmax_head_explained_on_logits(head):
    net, x = build_net(), images()
    model = {"softmax": lambda: nn.Sequential(net, nn.Softmax(dim=1)),
             "log_softmax": lambda: nn.Sequential(net, nn.LogSoftmax(dim=1)),
             "functional": lambda: FunctionalSoftmax(net)}[head]()
    clf, ref = cl.Classifier(model, device="cpu"), cl.Classifier(net, device="cpu")
    with torch.no_grad():
        own = model(x)
    # an nn.Sequential's head is known at construction, any other module's after its first pass
    assert clf.output == ("auto" if head == "functional" else "probabilities")
    probs = clf.probs(x)
    assert clf.output == "probabilities" and "stripped" in clf.head_note
    torch.testing.assert_close(probs, own.exp() if head == "log_softmax" else own)
    torch.testing.assert_close(clf.logits(x), net(x))              # the pre-softmax logits, exactly
    target = torch.tensor([0, 2, 1])
    ours, theirs = (cl.explain(c, x, target=target, methods=METHODS, integrated_gradients__steps=16)
                    for c in (clf, ref))
    for m in METHODS:
        torch.testing.assert_close(ours[m], theirs[m], rtol=0, atol=0)


class CopiedSoftmax(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1).clone()      # the softmax is not the graph's last node


@pytest.mark.parametrize("last", ["softmax", "clone"])
def test_softmax_inside_torchscript_is_log_probabilities(last):
    """A traced model hides its softmax from hooks: found in its graph (or, when it is not the last
    node, from rows that sum to 1, with a warning), it is explained on log p, whose gradient autograd
    gives independently."""
    net, x = build_net(), images()
    model = nn.Sequential(net, nn.Softmax(dim=1)) if last == "softmax" else CopiedSoftmax(net)
    traced = torch.jit.trace(model.eval(), x)
    clf = cl.Classifier(traced, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probs = clf.probs(x)
    said = [str(w.message) for w in caught if "sums to 1" in str(w.message)]
    assert len(said) == (1 if last == "clone" else 0)
    assert clf.output == "probabilities" and "log-probabilities" in clf.head_note
    torch.testing.assert_close(probs, torch.softmax(net(x), dim=1))
    target = torch.tensor([1, 0, 2])
    xr = x.clone().requires_grad_(True)
    logp = torch.log_softmax(net(xr), dim=1).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(logp, xr)
    sal = cl.explain(clf, x, target=target, methods=["saliency"])["saliency"]
    torch.testing.assert_close(sal, g.abs().amax(dim=1), rtol=1e-4, atol=1e-7)
    # a plain logits model is not mistaken for probabilities
    plain = cl.Classifier(torch.jit.trace(net.eval(), x), device="cpu", in_channels=1, input_size=(16, 16))
    assert plain.output == "logits"


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_compiled_sigmoid_models_are_read_from_their_graph(kind):
    """TorchScript and torch.export models ending in sigmoid: probabilities turned back into logits."""
    from counterlens.loading import ExportedModule
    net, x = build_net(k=1), images(4)
    model = nn.Sequential(net, nn.Sigmoid()).eval()
    module = (torch.jit.trace(model, x) if kind == "torchscript"
              else ExportedModule(torch.export.export(model, (x,)).module()))
    clf = cl.Classifier(module, classes=["pneumonia"], device="cpu")
    with torch.no_grad():
        z, p = net(x)[:, 0], model(x)[:, 0]
    torch.testing.assert_close(clf.probs(x)[:, 1], p)
    assert clf.output == "sigmoid" and "compiled graph" in clf.head_note
    torch.testing.assert_close(clf.logits(x), torch.stack([-z / 2, z / 2], dim=1), rtol=1e-4, atol=1e-5)


# -- one sigmoid output: a binary classifier with two named classes -----------------------------------
@pytest.mark.parametrize("ends_in_sigmoid", [True, False])
def test_one_sigmoid_output_is_two_classes(ends_in_sigmoid):
    net, x = build_net(k=1), images(6)
    with torch.no_grad():
        net[-1].weight.mul_(40)          # some rows saturate: p rounds to 0 or 1 in float32
        z = net(x)[:, 0]
    model = nn.Sequential(net, nn.Sigmoid()) if ends_in_sigmoid else net
    clf = cl.Classifier(model, classes=["pneumonia"], device="cpu")
    assert clf.output == "sigmoid" and not clf.multilabel
    assert clf.classes == ["not pneumonia", "pneumonia"]
    probs = clf.probs(x)
    assert probs.shape == (6, 2)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(z))
    torch.testing.assert_close(probs[:, 0], torch.sigmoid(-z))
    torch.testing.assert_close(clf.logits(x), torch.stack([-z / 2, z / 2], dim=1))   # finite, the true logit
    assert torch.equal(clf.predict(x), (z > 0).long())
    assert resolve_targets(clf, x, "pneumonia").tolist() == [1] * 6
    # the saliency of "pneumonia" is that of the logit z / 2
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xr).sum() / 2, xr)
    sal = cl.explain(clf, x, target="pneumonia", methods=["saliency"])["saliency"]
    torch.testing.assert_close(sal, g.abs().amax(dim=1))


# -- multi-label ------------------------------------------------------------------------------------
def test_multilabel_probabilities_and_targets():
    net, x = build_net(k=4, seed=1), images(5)
    model = nn.Sequential(net, nn.Sigmoid())
    clf = cl.Classifier(model, classes=FINDINGS, device="cpu")
    with torch.no_grad():
        own, z = model(x), net(x)
    assert clf.output == "multilabel" and clf.multilabel
    torch.testing.assert_close(clf.probs(x), own)                        # per-finding sigmoid, not softmax
    torch.testing.assert_close(clf.logits(x), z)
    assert torch.equal(clf.positive(x, threshold=0.5), own >= 0.5)
    assert torch.equal(clf.predict(x), own.argmax(dim=1))
    assert resolve_targets(clf, x, "Effusion").tolist() == [1] * 5
    assert torch.equal(resolve_targets(clf, x, "predicted"), own.argmax(dim=1))
    tgt = torch.tensor([0, 1, 2, 3, 1])
    torch.testing.assert_close(Evaluator(clf, 2).scores(x, tgt, output="prob"), own.gather(1, tgt[:, None])[:, 0])
    torch.testing.assert_close(target_score(z, tgt, "probability", multilabel=True), own.gather(1, tgt[:, None])[:, 0])


def test_multilabel_integrated_gradients_on_a_finding_logit():
    net, x = build_net(k=4, seed=2), images(3)
    clf = cl.Classifier(nn.Sequential(net, nn.Sigmoid()), classes=FINDINGS, device="cpu")
    ig = cl.explain(clf, x, target="cardiomegaly", methods=["integrated_gradients"],
                    integrated_gradients__steps=32)["integrated_gradients"]
    with torch.no_grad():
        gap = net(x)[:, 2] - net(torch.zeros_like(x))[:, 2]
    torch.testing.assert_close(ig.flatten(1).sum(1), gap, rtol=1e-3, atol=1e-4)       # completeness
    theirs = IntegratedGradients(net.eval()).attribute(x, baselines=torch.zeros_like(x), target=2, n_steps=32,
                                                       method="gausslegendre")
    torch.testing.assert_close(ig, theirs.sum(dim=1).detach(), rtol=1e-4, atol=1e-6)


class OneFinding(nn.Module):
    """Finding ``k`` of a multi-label net alone: a one-output (sigmoid-logit) binary classifier."""

    def __init__(self, net, k):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        return self.net(x)[:, self.k:self.k + 1]


def test_multilabel_probability_methods_use_the_finding_sigmoid():
    """RISE and occlusion on probabilities score finding k by sigmoid(z_k): the same maps as the
    binary classifier made of that finding alone (its class 1 has probability sigmoid(z_k))."""
    net, x = build_net(k=4, seed=4), images(2)
    clf = cl.Classifier(nn.Sequential(net, nn.Sigmoid()), classes=FINDINGS, device="cpu")
    one = cl.Classifier(OneFinding(net, 3), device="cpu")
    kw = dict(methods=["rise", "occlusion"], rise__samples=64, occlusion__output="prob", occlusion__window=4)
    ours, theirs = cl.explain(clf, x, target="nodule", **kw), cl.explain(one, x, target=1, **kw)
    for m in ours:
        torch.testing.assert_close(ours[m], theirs[m], rtol=1e-5, atol=1e-6)


def test_expand_all_positive():
    x = torch.full((3, 1, 8, 8), 0.2)
    x[0, :, :, :4] = 0.9          # opacity, and cardiomegaly (top half mean 0.55)
    x[2, :, 4:, 4:] = 1.0         # nodule, and effusion (right half mean 0.6)
    clf = cl.Classifier(Regions(), classes=FINDINGS, device="cpu")
    own = Regions()(x)
    rows, targets = expand_targets(clf, x, "all-positive")
    want = (own >= 0.5).nonzero()
    assert rows.tolist() == want[:, 0].tolist() and targets.tolist() == want[:, 1].tolist()
    assert 1 not in rows.tolist()                                        # no positive finding: no pair
    again = expand_targets(clf, x, "all-positive", logits=clf.logits(x).detach(), threshold=0.5)
    assert again[0].tolist() == rows.tolist() and again[1].tolist() == targets.tolist()
    rows, targets = expand_targets(clf, x, "nodule")
    assert rows.tolist() == [0, 1, 2] and targets.tolist() == [3, 3, 3]
    with pytest.raises(TargetError, match="expand it first"):
        resolve_targets(clf, x, "all-positive")
    single = cl.Classifier(build_net(), device="cpu")
    with pytest.raises(TargetError, match="multi-label"):
        expand_targets(single, images(), "all-positive")
    with pytest.raises(InputError, match="multi-label"):
        single.positive(images())


# -- multi-label counterfactuals ------------------------------------------------------------------------
def test_multilabel_counterfactual_switches_one_finding():
    x = torch.full((2, 1, 8, 8), 0.2)
    x[:, :, :, :4] = 0.85         # opacity on (p = 0.94), cardiomegaly just on (top half mean 0.525)
    clf = cl.Classifier(Regions(), classes=FINDINGS, device="cpu", value_range=(0, 1))
    res = cl.counterfactual(clf, x, target="opacity:off")
    after = Regions()(res.x)
    assert res.multilabel and res.valid.all() and res.target.tolist() == [0, 0] and not res.target_on.any()
    torch.testing.assert_close(res.probs_after, after)                  # every finding reported as the model says
    torch.testing.assert_close(res.probs_before, Regions()(x))
    assert (after[:, 0] <= 0.5).all() and (after[:, 0] > 0.45).all()    # just across: a minimal edit
    d = res.difference()
    assert d[..., 4:].abs().max() == 0                                   # nothing outside the opacity region
    torch.testing.assert_close(after[:, [1, 3]], res.probs_before[:, [1, 3]])   # disjoint findings unchanged
    row = res.summary()[0]
    before = Regions()(x)
    changed = int(((before[0, 1:] >= 0.5) != (after[0, 1:] >= 0.5)).sum())    # cardiomegaly overlaps opacity
    assert row["target_state"] == "off" and row["target_name"] == "opacity" and row["others_changed"] == changed
    assert row["others_max_change"] == pytest.approx(float((after[0, 1:] - before[0, 1:]).abs().max()))
    assert res.findings(0)[0]["finding"] == "opacity" and not res.findings(0)[0]["positive_after"]
    on = cl.counterfactual(clf, x[:1], target="nodule:on", loss="ce")
    assert on.valid.all() and on.target_on.all() and Regions()(on.x)[0, 3] >= 0.5
    toggled = cl.counterfactual(clf, x[:1], target="opacity", candidates=2, schedule="bisection",
                                steps=60, lam_steps=2)
    assert toggled.valid.all() and not toggled.target_on.any()             # no state: switched to the other one
    assert toggled.candidates_valid.shape == (1, 2) and Regions()(toggled.x)[0, 0] <= 0.5
    with pytest.raises(TargetError, match="not a finding"):
        cl.counterfactual(clf, x, target="fracture:off")
    with pytest.raises(InputError, match="multi-label"):       # class autoencoders do not apply to findings
        im1(res, ae_by_class={0: None})


class Marker(nn.Module):
    """Two findings: "marker" (a bright 3 x 3 top-left corner) and "right" (a bright right half)."""

    def forward(self, x):
        marker = 30 * (x[:, 0, :3, :3].mean((1, 2)) - 0.5)
        right = 8 * (x[:, 0, :, 8:].mean((1, 2)) - 0.5)
        return torch.sigmoid(torch.stack([marker, right], dim=1))


def test_shortcut_audit_of_a_multilabel_model_counts_findings_switched():
    from counterlens.metrics.shortcut import audit
    x = 0.1 + 0.2 * images(8, size=16, seed=5)
    x[:5, :, :3, :3] = 1.0                                   # the marker on 5 of 8 images
    x[::2, :, :, 8:] += 0.6                                  # "right" on every other one
    clf = cl.Classifier(Marker(), classes=["marker", "right"], device="cpu")
    assert clf.output == "auto" and clf.probs(x).shape == (8, 2) and clf.multilabel
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[:3, :3] = True
    result = audit(clf, x, region, methods=(), n_random=4, labels=torch.zeros(8, dtype=torch.long))
    assert result["relies_on_region"] and result["region_flip_rate"] == pytest.approx(5 / 8)
    assert result["flips"] == {"marker on -> off": 5} and "accuracy" not in result


# -- errors, card, command line -----------------------------------------------------------------------
def test_head_errors():
    x = images()
    with pytest.raises(InputError, match="not a head"):
        cl.Classifier(build_net(), output="softmax")
    with pytest.raises(InputError, match="multilabel"):
        cl.Classifier(build_net(k=3), output="sigmoid", device="cpu").logits(x)
    with pytest.raises(InputError, match="not probabilities"):
        cl.Classifier(build_net(), output="probabilities", device="cpu").logits(x)
    with pytest.raises(InputError, match="probabilities"):
        cl.Classifier(nn.Sequential(build_net(), nn.Softmax(1)), output="multilabel", device="cpu").logits(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="output='logits' but the model ends in"):
            cl.Classifier(nn.Sequential(build_net(), nn.Softmax(1)), output="logits", device="cpu").logits(x)


def test_card_round_trip_of_output(tmp_path):
    model, x = build_multilabel(), images()
    factory = f"{__file__}:build_multilabel"
    save_model_card(model, tmp_path / "auto", factory=factory, classes=FINDINGS, in_channels=1, input_size=(16, 16))
    assert read_model_card(tmp_path / "auto")["output"] == "multilabel"          # detected when saved
    clf = load_model(tmp_path / "auto", factory=factory, device="cpu")
    assert clf.output == "multilabel"
    torch.testing.assert_close(clf.probs(x), model(x).detach())
    save_model_card(model, tmp_path / "given", factory=factory, classes=FINDINGS, output="multilabel")
    assert read_model_card(tmp_path / "given")["output"] == "multilabel"
    with pytest.warns(UserWarning, match="ends in"):
        assert load_model(tmp_path / "given", factory=factory, device="cpu", output="logits").output == "logits"
    card = read_model_card(tmp_path / "given")
    (tmp_path / "given" / "model.json").write_text(
        (tmp_path / "given" / "model.json").read_text().replace('"output": "multilabel"', '"output": "softmax"'))
    with pytest.raises(ModelLoadError, match="output"):
        read_model_card(tmp_path / "given")
    assert card["output"] == "multilabel"

    from counterlens.cli.common import load_classifier
    from counterlens.cli.parser import build_parser
    args = build_parser().parse_args(["explain", "--model", str(tmp_path / "auto"), "--factory", factory,
                                      "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                      "--output-head", "multilabel", "--device", "cpu"])
    assert load_classifier(args).output == "multilabel"
