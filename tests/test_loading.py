import json
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from counterlens.errors import InputError, ModelLoadError, UntrustedModelError
from counterlens.loading import (ExportedModule, file_sha256, load_model, read_model_card,
                                 save_model_card)
from counterlens.model import Normalize
from counterlens.models import brain_tumor_cnn, small_resnet

FACTORY = "counterlens.models:small_resnet"
KW = {"num_classes": 3, "input_size": 32, "width": 0.5}


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = small_resnet(**KW)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode loading matters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def x():
    return torch.rand(5, 1, 32, 32)


def assert_same_outputs(clf, net, x):
    with torch.no_grad():
        assert torch.equal(clf.logits(x), net(x))


def test_model_card_round_trip(tmp_path, net, x):
    out = save_model_card(net, tmp_path / "card", factory=FACTORY, kwargs=KW, classes=["a", "b", "c"],
                          preprocess=Normalize([0.5], [0.25]), extra={"test_accuracy": 0.9})
    card = read_model_card(out)
    assert card["format"] == "counterlens-model/1" and card["test_accuracy"] == 0.9
    assert card["input_size"] == [32, 32] and card["preprocess"][0]["normalize"]["std"] == [0.25]
    assert card["weights_sha256"] == file_sha256(out / "weights.safetensors")
    # the card names a factory: importing it needs consent
    with pytest.raises(UntrustedModelError, match="--factory"):
        load_model(out, device="cpu")
    clf = load_model(out, factory=FACTORY, device="cpu")
    assert clf.classes == ["a", "b", "c"] and clf.input_size == (32, 32) and clf.value_range == (0.0, 1.0)
    assert clf.card["factory"] == FACTORY and clf.source_hash == card["weights_sha256"]
    with torch.no_grad():
        assert torch.equal(clf.logits(x), net((x - 0.5) / 0.25))
    trusted = load_model(out / "model.json", trust_model_file=True, device="cpu")
    assert torch.equal(trusted.logits(x), clf.logits(x))


def test_model_card_architecture_and_tamper(tmp_path, x):
    torch.manual_seed(1)
    net = brain_tumor_cnn(num_classes=4, input_size=32, width=0.125).eval()
    out = save_model_card(net, tmp_path, architecture="brain-tumor-cnn",
                          kwargs={"num_classes": 4, "input_size": [32, 32], "width": 0.125},
                          classes=["glioma", "meningioma", "none", "pituitary"], preprocess=None)
    clf = load_model(out, device="cpu")  # built-in architecture: no consent needed
    assert_same_outputs(clf, net, x)
    assert not clf.module.training
    weights = out / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(out, device="cpu")


def test_save_model_card_arguments(tmp_path, net):
    with pytest.raises(InputError, match="exactly one"):
        save_model_card(net, tmp_path, kwargs=KW, classes=["a"])
    with pytest.raises(InputError, match="unknown architecture"):
        save_model_card(net, tmp_path, architecture="resnet-9000", classes=["a"])
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ModelLoadError, match="format"):
        read_model_card(tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_factory_state_dict(tmp_path, net, x, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(net.state_dict(), path)
    clf = load_model(path, factory=FACTORY, factory_kwargs=KW, device="cpu", classes=["a", "b", "c"])
    assert_same_outputs(clf, net, x)
    assert clf.source_hash == file_sha256(path) and clf.card is None


def test_factory_checkpoint_dict_and_prefix(tmp_path, net, x):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    assert_same_outputs(load_model(path, factory=FACTORY, factory_kwargs=KW, device="cpu"), net, x)


def test_factory_safetensors_and_file_factory(tmp_path, net, x):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    assert_same_outputs(load_model(path, factory=FACTORY, factory_kwargs=KW, device="cpu"), net, x)
    code = tmp_path / "mynet.py"
    code.write_text("from counterlens.models import small_resnet\n"
                    f"def build():\n    return small_resnet(**{KW!r})\n")
    assert_same_outputs(load_model(path, factory=f"{code}:build", device="cpu"), net, x)


def test_factory_mismatch_lists_keys(tmp_path, net):
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ModelLoadError, match="shape mismatches: fc.weight"):
        load_model(path, factory=FACTORY, factory_kwargs={**KW, "num_classes": 2}, device="cpu")
    with pytest.raises(ModelLoadError, match="missing keys"):
        load_model(path, factory="counterlens.models:brain_tumor_cnn", factory_kwargs={"input_size": 32},
                   device="cpu")
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_model(path, factory="no_such_package.nets:build", device="cpu")
    with pytest.raises(InputError, match="package.module:function"):
        load_model(path, factory="small_resnet", device="cpu")


def test_torchscript(tmp_path, net, x):
    path = tmp_path / "model.weird"  # detected by content, not suffix
    torch.jit.script(net).save(str(path))
    clf = load_model(path, device="cpu")
    assert isinstance(clf.module, torch.jit.ScriptModule)
    assert_same_outputs(clf, net, x)
    with pytest.raises(ModelLoadError, match="drop factory"):
        load_model(path, factory=FACTORY, device="cpu")


def test_torch_export_dynamic_batch(tmp_path, net, x):
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    clf = load_model(path, device="cpu")
    assert isinstance(clf.module, ExportedModule) and clf.module.batch is None
    with torch.no_grad():
        torch.testing.assert_close(clf.logits(x), net(x))
    xg = x.clone().requires_grad_()
    clf.logits(xg).sum().backward()  # gradients flow through the exported graph
    assert xg.grad.abs().sum() > 0


def test_torch_export_static_batch(tmp_path, net, x):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(net, (x[:2],)), str(path))
    with pytest.warns(UserWarning, match="fixed batch of 2.*dynamic_shapes"):
        clf = load_model(path, device="cpu")
    assert clf.module.batch == 2
    with torch.no_grad():  # 5 rows fed as 2 + 2 + 1 (padded)
        torch.testing.assert_close(clf.logits(x), net(x))


def test_full_pickle_refused_then_trusted(tmp_path, net, x):
    path = tmp_path / "full.pt"
    torch.save(net, path)
    with pytest.raises(UntrustedModelError) as info:
        load_model(path, device="cpu")
    msg = str(info.value)
    assert "--trust-model-file" in msg and "arbitrary code" in msg and "--factory" in msg
    assert "SmallResNet" in msg
    clf = load_model(path, trust_model_file=True, device="cpu")
    assert_same_outputs(clf, net, x)
    # with a factory, a trusted full pickle gives its weights to the factory's network
    assert_same_outputs(load_model(path, factory=FACTORY, factory_kwargs=KW, trust_model_file=True, device="cpu"), net, x)


def test_state_dict_without_factory(tmp_path, net):
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ModelLoadError, match="factory") as info:
        load_model(path, device="cpu")
    assert not isinstance(info.value, UntrustedModelError)


def test_missing_and_garbage(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="model.json"):
        load_model(tmp_path)  # a directory without a card
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ModelLoadError, match="garbage.pt") as info:
        load_model(bad, factory=FACTORY)
    assert not isinstance(info.value, UntrustedModelError)
    with pytest.raises(ModelLoadError, match="truncated"):
        torch.save(torch.zeros(3), tmp_path / "t.pt")
        (tmp_path / "cut.pt").write_bytes((tmp_path / "t.pt").read_bytes()[:200])
        load_model(tmp_path / "cut.pt", factory=FACTORY)
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as zf:  # a zip, but not one torch wrote
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="other.pt") as info:
        load_model(tmp_path / "other.pt", factory=FACTORY)
    assert info.value.__cause__ is not None
    with pytest.raises(ModelLoadError, match="garbage.safetensors"):
        (tmp_path / "garbage.safetensors").write_bytes(b"xx")
        load_model(tmp_path / "garbage.safetensors", factory=FACTORY)
    torch.save({"a": 1}, tmp_path / "notsd.pt")
    with pytest.raises(ModelLoadError, match="neither a model nor a state_dict"):
        load_model(tmp_path / "notsd.pt", factory=FACTORY)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"state_dict": _Evil(str(marker))}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(_Evil(str(marker)), fh)
    assert not marker.exists()
    for kwargs in ({}, {"factory": FACTORY}):
        with pytest.raises(UntrustedModelError, match="--trust-model-file"):
            load_model(path, device="cpu", **kwargs)
        assert not marker.exists()
    # a card whose weights.pt is the malicious pickle is refused too
    card = tmp_path / "card"
    save_model_card(small_resnet(**KW), card, architecture="small-resnet", kwargs=KW, classes=list("abc"))
    os.replace(path, card / "weights.pt")
    meta = json.loads((card / "model.json").read_text())
    meta.update(weights="weights.pt", weights_sha256=None)
    (card / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UntrustedModelError):
        load_model(card, device="cpu")
    assert not marker.exists()
    # the test is meaningful: with trust the payload runs (and the result is still refused as no model)
    with pytest.raises(ModelLoadError):
        load_model(card / "weights.pt", trust_model_file=True, device="cpu")
    assert marker.exists()


def test_card_weights_must_stay_inside(tmp_path, net):
    out = save_model_card(net, tmp_path / "card", architecture="small-resnet", kwargs=KW, classes=list("abc"))
    meta = json.loads((out / "model.json").read_text())
    meta["weights"] = "../elsewhere.safetensors"
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="inside"):
        load_model(out, device="cpu")


def test_malicious_export_archive_never_runs(tmp_path, net, x):
    """torch.export.load falls back to weights_only=False for sample inputs it cannot load safely."""
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(net, (x[:2],)), str(good))
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save(_Evil(str(marker)), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = payload.read_bytes()
            dst.writestr(info.filename, data)
    with pytest.raises(UntrustedModelError, match="--trust-model-file"):
        load_model(evil, device="cpu")
    assert not marker.exists()
    try:  # with trust, torch.export.load itself runs the payload: the check above is what protects
        load_model(evil, trust_model_file=True, device="cpu")
    except ModelLoadError:
        pass
    assert marker.exists()


@pytest.mark.parametrize("attack", ["opaque_in_subfolder", "pickle_flag", "unknown_entry", "config_path_escape"])
def test_export_archive_is_checked_against_an_allow_list(tmp_path, net, x, attack):
    """Entries a plain program does not contain are refused without --trust-model-file, whatever
    their names (the old check looked for base names beginning opaque_obj / custom_obj)."""
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(net, (x[:2],)), str(good))
    assert load_model(good, device="cpu") is not None                  # a plain program loads
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save(_Evil(str(marker)), payload)
    evil = tmp_path / f"{attack}.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data/constants/model_constants_config.json"):
                config = json.loads(data)
                if attack == "opaque_in_subfolder":
                    config["config"]["c"] = {"path_name": "sub/opaque_obj_0", "use_pickle": False}
                elif attack == "pickle_flag":
                    config["config"]["c"] = {"path_name": "constant_0", "use_pickle": True}
                elif attack == "config_path_escape":
                    config["config"]["c"] = {"path_name": "../../models/x", "use_pickle": False}
                data = json.dumps(config).encode()
            dst.writestr(info.filename, data)
        if attack == "opaque_in_subfolder":
            dst.writestr(f"{root}/data/constants/sub/opaque_obj_0", payload.read_bytes())
        elif attack == "pickle_flag":
            dst.writestr(f"{root}/data/constants/constant_0", payload.read_bytes())
        elif attack == "unknown_entry":
            dst.writestr(f"{root}/extra/anything.pkl", payload.read_bytes())
    with pytest.raises(UntrustedModelError, match="--trust-model-file"):
        load_model(evil, device="cpu")
    assert not marker.exists()
