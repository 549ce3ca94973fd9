"""TorchScript (scripted, traced) and torch.export models: the CAM methods and the randomisation
sanity check give the eager model's results; a method that cannot run on a model is skipped in a
run with its reason, and the other methods' maps are kept."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import single_thread
from PIL import Image
from torch import nn

import counterlens as cl
from counterlens.attribution import METHODS
from counterlens.cli import main
from counterlens.errors import InputError, MethodError
from counterlens.loading import load_model
from counterlens.metrics.sanity import model_randomisation
from counterlens.runs.dataset import explain_folder

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

CAMS = ("gradcam", "gradcam_plus_plus", "layercam", "scorecam", "guided_gradcam")


class Net(nn.Module):
    """conv-BN-ReLU(in place), max-pool, conv-ReLU, a residual conv with a functional ReLU, a 1x1 conv, mean, linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.res = nn.Conv2d(16, 16, 3, padding=1)
        self.post = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.features(x)
        h = F.relu(self.res(h)) + h
        return self.head(self.post(h).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():                                  # BatchNorm statistics that are not the identity
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    root = tmp_path_factory.mktemp("exported")
    torch.jit.script(net).save(str(root / "scripted.pt"))
    torch.jit.trace(net, x).save(str(root / "traced.pt"))
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(root / "program.pt2"))
    eager = cl.Classifier(net, device="cpu")
    loaded = {kind: load_model(root / name, device="cpu") for kind, name in
              (("scripted", "scripted.pt"), ("traced", "traced.pt"), ("export", "program.pt2"))}
    return eager, loaded, x


@pytest.mark.parametrize("kind", ["scripted", "traced", "export"])
def test_cam_methods_on_exported_models_equal_the_eager_model(models, kind):
    eager, loaded, x = models
    clf = loaded[kind]
    target = eager.predict(x)
    before = clf.logits(x).detach()
    for name in CAMS:
        ref = METHODS[name].function(eager, x, target)
        out = METHODS[name].function(clf, x, target)
        assert ref.abs().amax() > 0, name
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().amax()), msg=f"{kind} {name}")
    # guided backprop sees the exported graph's ReLUs too (not the plain gradient)
    torch.testing.assert_close(METHODS["guided_backprop"].function(clf, x, target),
                               METHODS["guided_backprop"].function(eager, x, target), rtol=1e-4, atol=1e-7)
    assert torch.equal(clf.logits(x).detach(), before)           # the model is left as found


def test_layers_of_exported_models_can_be_named(models):
    eager, loaded, x = models
    target = eager.predict(x)
    ref = METHODS["layercam"].function(eager, x, target, layer="features.0")
    torch.testing.assert_close(METHODS["layercam"].function(loaded["export"], x, target, layer="features.0"), ref,
                               rtol=1e-4, atol=1e-7)      # the eager name, inside the program's view
    # TorchScript: layers are the graph's nodes; the first conv's result is node 'conv2d' (scripted)
    torch.testing.assert_close(METHODS["layercam"].function(loaded["scripted"], x, target, layer="conv2d"), ref,
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(InputError, match=r"layer='features\.9' is not a module of this model; some names"):
        METHODS["gradcam"].function(loaded["scripted"], x, target, layer="features.9")


@pytest.mark.parametrize("kind", ["scripted", "traced", "export"])
def test_randomisation_sanity_check_on_exported_models_equals_eager(models, kind):
    eager, loaded, x = models
    for method in ("gradcam", "saliency"):
        ref = model_randomisation(eager, x, method, random_logit=False)
        out = model_randomisation(loaded[kind], x, method, random_logit=False)
        assert [n.split(".", 1)[1] for n in out.layers] == ref.layers == ["head", "post", "res", "features.4",
                                                                           "features.1", "features.0"]
        np.testing.assert_allclose(out.similarity, ref.similarity, atol=1e-4)
        assert out.passed == ref.passed


class MLP(nn.Module):
    """No spatial layer: CAM methods truly cannot run on it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def _folder(root, n=3):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_method_that_cannot_run_is_skipped_with_its_reason_and_the_others_kept(tmp_path):
    from counterlens.data.images import ImageFolder
    torch.manual_seed(0)
    clf = cl.Classifier(MLP().eval(), device="cpu", classes=["a", "b"], input_size=(8, 8))
    data = _folder(tmp_path / "data")
    summary = explain_folder(clf, ImageFolder(data, channels=1, size=(8, 8), classes=["a", "b"]), tmp_path / "run",
                             methods=["gradcam", "saliency"], progress=False, workers=1)
    assert summary.done == 6 and summary.failed == 0
    run = cl.open_run(tmp_path / "run")
    assert set(run.skipped) == {"gradcam"} and "no module of this model has a spatial output" in run.skipped["gradcam"]
    assert (run.cases.status == "done").all()
    x = torch.stack([torch.from_numpy(run.image(p)) for p in run.cases.path])
    direct = METHODS["saliency"].function(clf, x, "predicted")
    for j, path in enumerate(run.cases.path):
        np.testing.assert_allclose(run.map(path, "saliency"), direct[j].numpy(), rtol=1e-5, atol=1e-8)
    assert set(run.table("skipped").case_id) == set(run.cases.path)     # recorded per case
    from counterlens.viz.report import write_report
    html = write_report(tmp_path / "run").read_text()
    assert "Methods skipped" in html and "no module of this model has a spatial output" in html   # the report says why
    again = explain_folder(clf, ImageFolder(data, channels=1, size=(8, 8), classes=["a", "b"]), tmp_path / "run",
                           methods=["gradcam", "saliency"], progress=False, workers=1)
    assert again.done == 0 and again.skipped == 6                      # a skipped method counts as done


@pytest.mark.slow
def test_cli_run_of_a_torchscript_model_keeps_going_and_says_why(tmp_path, capsys):
    torch.manual_seed(0)
    torch.jit.script(MLP().eval()).save(str(tmp_path / "mlp.pt"))
    data = _folder(tmp_path / "data", n=2)
    code = main(["explain", "--model", str(tmp_path / "mlp.pt"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--methods", "gradcam,saliency,occlusion", "--param", "occlusion.window=4", "--quiet", "--no-report",
                 "--workers", "1", "--precision", "bf16"])
    out = capsys.readouterr().out
    assert code == 0 and "explained 4 images" in out
    assert "skipped gradcam: gradcam cannot run on this model" in out
    run = cl.open_run(tmp_path / "run")
    assert set(run.skipped) == {"gradcam"}
    assert all(run.map(p, m).shape == (8, 8) and np.isfinite(run.map(p, m)).all()
               for p in run.cases.path for m in ("saliency", "occlusion"))
    assert run.spec["model"]["precision"] == "bf16"               # --precision: autocast, recorded in run.yaml


def test_fixed_batch_export_says_how_to_fix(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(2, 1, 16, 16)
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "fixed.pt2"))
    with pytest.warns(UserWarning, match="fixed batch of 2"):
        clf = load_model(tmp_path / "fixed.pt2", device="cpu")
    xs = torch.rand(3, 1, 16, 16)
    with pytest.raises(MethodError, match="dynamic batch"):
        METHODS["gradcam"].function(clf, xs, 0, batch_size=3)


def test_a_scripted_part_inside_an_eager_model_is_left_out_not_fatal():
    torch.manual_seed(0)
    backbone = torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()))

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.conv, self.head = backbone, nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(self.backbone(x)).mean(dim=(2, 3)))

    clf = cl.Classifier(Mixed().eval(), device="cpu")
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    assert cl.attribution.find_target_layer(clf, x) == "conv"        # the scripted backbone is opaque
    assert METHODS["gradcam"].function(clf, x, 0).shape == (2, 8, 8)
    assert model_randomisation(clf, x, "saliency", random_logit=False).layers == ["head", "conv"]
    with pytest.raises(MethodError, match="TorchScript part of an eager model"):
        METHODS["gradcam"].function(clf, x, 0, layer="backbone")
