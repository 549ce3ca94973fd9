"""The autoencoder prior and class prototypes on real data (sklearn digits, 8x8, scaled to [0, 1])."""
import argparse
import json

import numpy as np
import pytest
import torch

from counterlens.cli.fit_prior import fit_prior_command
from counterlens.cli.parser import add_fit_prior_parser
from counterlens.counterfactual.prior import (
    AutoencoderPrior,
    class_prototypes,
    fit_prior,
    instance_prototypes,
    reconstruction_mse,
)
from counterlens.errors import DataFileError, InputError, ModelLoadError


@pytest.fixture(scope="module")
def prior(digits):
    x, _, _, _ = digits
    return fit_prior(x, epochs=30, seed=0, progress=False)


def test_reconstructs_test_digits_far_better_than_the_mean_image(digits, prior):
    x, _, x_test, _ = digits
    mse = reconstruction_mse(prior, x_test).mean().item()
    baseline = (x_test - x.mean(0, keepdim=True)).pow(2).mean().item()
    # a PCA with as many components as the code has numbers (4 x 2 x 2 = 16), for scale
    from sklearn.decomposition import PCA
    pca = PCA(16).fit(x.flatten(1).numpy())
    rec = pca.inverse_transform(pca.transform(x_test.flatten(1).numpy()))
    pca_mse = float(((rec - x_test.flatten(1).numpy()) ** 2).mean())
    print(f"test MSE: autoencoder {mse:.4f}, mean image {baseline:.4f}, PCA-16 {pca_mse:.4f}")
    assert mse < baseline / 4
    assert mse < 2 * pca_mse
    assert prior.info["training"]["loss_per_epoch"][-1] < prior.info["training"]["loss_per_epoch"][0] / 3


def test_encode_decode_shapes_and_differentiable_error(digits, prior):
    _, _, x_test, _ = digits
    xb = x_test[:5].clone().requires_grad_(True)
    z = prior.encode(xb)
    assert z.shape == (5, 4, 2, 2) == (5, *prior.latent_shape((8, 8)))
    assert prior.decode(z).shape == xb.shape
    err = prior.reconstruction_error(xb)
    assert torch.allclose(err, (prior(xb) - xb).pow(2).flatten(1).mean(1))
    (grad,) = torch.autograd.grad(err.sum(), xb)
    assert grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in prior.parameters())
    assert not prior.training
    # the prior normalises inside: mean and std are the training data's
    assert torch.allclose(prior.mean, digits[0].mean().view(1)) and torch.allclose(prior.std, digits[0].std().view(1))


def test_save_load_round_trip_is_exact_and_safe(digits, prior, tmp_path):
    _, _, x_test, _ = digits
    prior.save(tmp_path / "p", extra={"note": "digits"})
    card = json.loads((tmp_path / "p" / "prior.json").read_text())
    assert card["format"] == "counterlens-prior/1" and card["latent_channels"] == 4 and card["note"] == "digits"
    loaded = AutoencoderPrior.load(tmp_path / "p")
    assert torch.equal(loaded(x_test), prior(x_test))
    assert torch.equal(loaded.encode(x_test), prior.encode(x_test))
    assert loaded.info["training"]["seed"] == 0 and not loaded.training
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["prior.json", "weights.safetensors"]
    # tampered weights, wrong format, missing folder: ModelLoadError naming the file
    (tmp_path / "p" / "weights.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        AutoencoderPrior.load(tmp_path / "p")
    card["format"] = "pickle"
    (tmp_path / "p" / "prior.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="format"):
        AutoencoderPrior.load(tmp_path / "p")
    with pytest.raises(ModelLoadError, match="prior.json"):
        AutoencoderPrior.load(tmp_path / "nothing")


def test_fit_is_deterministic_and_leaves_the_global_rng(digits):
    x = digits[0][:200]
    state = torch.get_rng_state()
    a = fit_prior(x, epochs=2, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = fit_prior(x, epochs=2, seed=3, progress=False)
    c = fit_prior(x, epochs=2, seed=4, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_sizes_not_divisible_by_four_and_volumes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 10, 7, generator=g)
    p = fit_prior(x, epochs=1, progress=False, channels=(8, 8), latent_channels=2)
    assert p.encode(x).shape == (6, 2, 3, 2)
    assert p(x).shape == x.shape and p.decode(p.encode(x)).shape == x.shape   # default crop to the fitted size
    assert p.decode(p.encode(x), size=(9, 5)).shape == (6, 3, 9, 5)
    with pytest.raises(InputError, match="size"):
        p.decode(p.encode(x), size=(20, 7))
    with pytest.raises(InputError, match=r"3 channel"):
        p.encode(torch.rand(2, 1, 10, 7))
    vol = torch.rand(4, 1, 8, 8, 8, generator=g)
    pv = fit_prior(vol, epochs=1, progress=False, channels=(4,), latent_channels=2)
    assert pv.encode(vol).shape == (4, 2, 4, 4, 4) and pv(vol).shape == vol.shape
    with pytest.raises(InputError, match="at least 2 images"):
        fit_prior(torch.rand(8, 8))
    with pytest.raises(InputError, match="NaN"):
        fit_prior(torch.full((3, 1, 4, 4), float("nan")))
    with pytest.raises(InputError, match="epochs"):
        fit_prior(x, epochs=0)


def test_class_prototypes_follow_the_definition_and_decode_to_their_class(digits, prior):
    x, y, _, _ = digits
    protos = class_prototypes(prior, x, y, 10)
    assert protos.shape == (10, 4, 2, 2)
    with torch.no_grad():
        codes = prior.encode(x).flatten(1)
    for c in (0, 7):
        assert torch.allclose(protos[c].flatten(), codes[y == c].mean(0), atol=1e-6)
    # k nearest to the class mean, brute force
    near = class_prototypes(prior, x, y, 10, k=5)
    zc = codes[y == 3]
    order = sorted(range(len(zc)), key=lambda i: float(((zc[i] - zc.mean(0)) ** 2).sum()))
    assert torch.allclose(near[3].flatten(), zc[order[:5]].mean(0), atol=1e-6)
    # each decoded prototype is recognised as its class by a classifier trained on the pixels
    from sklearn.linear_model import LogisticRegression
    lr = LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy())
    with torch.no_grad():
        pred = lr.predict(prior.decode(near).flatten(1).numpy())
    print("decoded k=5 prototypes classified as", pred.tolist())
    assert (pred == np.arange(10)).all()
    with pytest.raises(InputError, match="no images of class"):
        class_prototypes(prior, x[y < 9], y[y < 9], 10)
    with pytest.raises(InputError, match="k="):
        class_prototypes(prior, x, y, 10, k=0)


def test_instance_prototypes_match_a_brute_force_loop(digits, prior):
    x, y, x_test, _ = digits
    got = instance_prototypes(prior, x_test[:6], x, y, 10, k=4, batch_size=4)
    assert got.shape == (6, 10, 4, 2, 2)
    with torch.no_grad():
        codes, z0 = prior.encode(x).flatten(1), prior.encode(x_test[:6]).flatten(1)
    for b in (0, 5):
        for c in (2, 9):
            zc = codes[y == c]
            d = ((zc - z0[b]) ** 2).sum(1)
            assert torch.allclose(got[b, c].flatten(), zc[d.argsort()[:4]].mean(0), atol=1e-5)
    every = instance_prototypes(prior, x_test[:3], x, y, 10)
    assert torch.allclose(every, class_prototypes(prior, x, y, 10).expand(3, -1, -1, -1, -1), atol=1e-6)


def _synthetic_folder(tmp_path):
    from counterlens.data.synthetic import make_dataset, write_dataset
    return write_dataset(make_dataset("chest-xray", n_train=24, n_test=8, size=32, seed=0), tmp_path / "data")


def test_fit_prior_command_writes_a_loadable_prior(tmp_path, capsys):
    data = _synthetic_folder(tmp_path)
    parser = argparse.ArgumentParser(prog="counterlens")
    sub = parser.add_subparsers(dest="command")
    add_fit_prior_parser(sub)
    args = parser.parse_args(["fit-prior", "--data", str(data), "--out", str(tmp_path / "prior"), "--size", "32",
                              "--epochs", "2", "--quiet"])
    assert fit_prior_command(args) == 0
    out = capsys.readouterr().out
    assert "test reconstruction MSE" in out and "mean-image baseline" in out and str(tmp_path / "prior") in out
    prior = AutoencoderPrior.load(tmp_path / "prior")
    card = json.loads((tmp_path / "prior" / "prior.json").read_text())
    assert card["input_size"] == [32, 32] and card["n_test"] == 8 and card["training"]["n_train"] == 24
    assert prior.encode(torch.rand(1, 1, 32, 32)).shape == (1, 4, 8, 8)
    # a flat folder without Testing works too; a missing folder is a clear error
    args.data, args.out = data / "Testing" / "normal", tmp_path / "prior2"
    assert fit_prior_command(args) == 0
    assert (tmp_path / "prior2" / "prior.json").is_file()
    args.data = tmp_path / "missing"
    with pytest.raises(DataFileError, match="does not exist"):
        fit_prior_command(args)


def test_fit_prior_help(capsys):
    parser = argparse.ArgumentParser(prog="counterlens")
    add_fit_prior_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["fit-prior", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: counterlens fit-prior") and "--latent-channels" in out and "--epochs" in out


@pytest.fixture(scope="module")
def digits_clf(digits):
    from conftest import digits_cnn, fit_digits

    import counterlens as cl
    x, y, _, _ = digits
    torch.manual_seed(0)
    net = fit_digits(digits_cnn(), x, y, epochs=10)
    return cl.Classifier(net, device="cpu", value_range=(0.0, 1.0))


@pytest.mark.slow
def test_prototype_and_latent_counterfactuals_are_more_plausible_by_im1(digits, prior, digits_clf):
    """Van Looveren & Klaise's IM1 (target-class autoencoder error over the original class's, lower
    is more like the target class), with class autoencoders independent of the search's prior:
    guided by class prototypes, or searched in the prior's code, counterfactuals of 40 test digits
    look more like their new class than plain pixel-space ones."""
    from counterlens.counterfactual import counterfactual
    from counterlens.counterfactual.prior import fit_class_autoencoders
    from counterlens.metrics.counterfactual import im1
    x, y, x_test, _ = digits
    aes = fit_class_autoencoders(x, y, 10, seed=100, epochs=15)
    protos = class_prototypes(prior, x, y, 10)
    xs = x_test[:40]
    runs = {"plain": counterfactual(digits_clf, xs),
            "prototypes": counterfactual(digits_clf, xs, prior=prior, prototypes=protos, proto_weight=10.0),
            "latent": counterfactual(digits_clf, xs, prior=prior, latent=True)}
    score = {}
    for name, r in runs.items():
        v = r.valid
        assert float(v.float().mean()) >= 0.95, name
        score[name] = float(im1(r.x[v], r.target[v], r.probs_before.argmax(1)[v], aes).mean())
    print("IM1 (mean over valid rows):", {k: round(v, 3) for k, v in score.items()})
    assert score["prototypes"] < score["plain"] - 0.05
    assert score["latent"] < score["plain"] - 0.05
