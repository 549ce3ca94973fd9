"""Counterfactual metrics against hand-computed values, brute force, and real digits (IM1 sanity)."""
from types import SimpleNamespace

import pytest
import torch

from counterlens.counterfactual.prior import fit_class_autoencoders, fit_prior
from counterlens.errors import InputError
from counterlens.metrics import distances, diversity, im1, im2, nearest_training_distance, proximity, sparsity, validity


@pytest.fixture(scope="module")
def class_aes(digits):
    x, y, _, _ = digits
    return fit_class_autoencoders(x, y, 10, epochs=40, batch_size=64)


def _hand_case():
    x_orig = torch.zeros(2, 1, 2, 2)
    x_cf = torch.tensor([[[[0.5, 0.0], [0.0, -0.25]]], [[[0.0005, 1.0], [1.0, 1.0]]]])
    return x_cf, x_orig


def test_distances_sparsity_proximity_validity_by_hand():
    x_cf, x_orig = _hand_case()
    d = distances(x_cf, x_orig)
    assert d["l0"].tolist() == [2, 3]                                # 0.0005 is below tol=1e-3
    assert torch.allclose(d["l1"], torch.tensor([0.75, 3.0005], dtype=torch.float64))
    want_l2 = torch.tensor([(0.25 + 0.0625) ** 0.5, (3 + 0.0005 ** 2) ** 0.5], dtype=torch.float64)
    assert torch.allclose(d["l2"], want_l2)
    assert d["linf"].tolist() == [0.5, 1.0]
    assert sparsity(x_cf, x_orig).tolist() == [0.5, 0.75]
    assert sparsity(x_cf, x_orig, tol=1e-4).tolist() == [0.5, 1.0]
    p = proximity(x_cf, x_orig)
    assert p["n"] == 2 and p["l1"] == pytest.approx((0.75 + 3.0005) / 2)
    result = SimpleNamespace(x=x_cf, x_orig=x_orig, valid=torch.tensor([True, False]))
    assert validity(result) == 0.5 and validity(torch.tensor([True, True, True, False])) == 0.75
    p = proximity(result)                                          # only valid rows by default
    assert p["n"] == 1 and p["l1"] == pytest.approx(0.75) and p["l2"] == pytest.approx(0.3125 ** 0.5)
    assert proximity(result, only_valid=False)["n"] == 2
    assert proximity(x_cf, x_orig, valid=torch.tensor([False, False]))["l1"] != proximity(x_cf, x_orig)["l1"]
    # multi-channel: pixels=True counts a pixel once when any channel changed
    a = torch.zeros(1, 3, 1, 2)
    b = a.clone()
    b[0, :, 0, 0] = 1.0
    assert sparsity(b, a).item() == pytest.approx(0.5) and sparsity(b, a, pixels=True).item() == pytest.approx(0.5)
    b[0, 0, 0, 1] = 1.0
    assert sparsity(b, a).item() == pytest.approx(4 / 6) and sparsity(b, a, pixels=True).item() == 1.0
    with pytest.raises(InputError, match="same shape"):
        distances(x_cf, x_orig[:1])


def test_diversity_by_hand():
    c = torch.zeros(2, 3, 1, 2)
    c[0, 1] = 1.0           # pairwise L1: (0,1)=2, (0,2)=0, (1,2)=2 -> mean over ordered pairs = 4/3
    assert torch.allclose(diversity(c), torch.tensor([4 / 3, 0.0], dtype=torch.float64))
    assert diversity(c[:, :1]).tolist() == [0.0, 0.0]


def test_nearest_training_distance_equals_brute_force(digits):
    x, y, x_test, _ = digits
    g = torch.Generator().manual_seed(1)
    x_cf = (x_test[:12] + 0.1 * torch.randn(12, 1, 8, 8, generator=g)).clamp(0, 1)
    target = torch.randint(0, 10, (12,), generator=g)
    got, idx = nearest_training_distance(x_cf, target, x, y, chunk=37, return_index=True)
    for r in range(12):
        best, arg = min((float(torch.linalg.vector_norm(x_cf[r].double() - x[i].double())), i)
                        for i in range(len(x)) if y[i] == target[r])
        assert got[r].item() == pytest.approx(best, rel=1e-9) and idx[r].item() == arg
    assert torch.allclose(nearest_training_distance(x_cf, target, x, y, chunk=5000), got)
    # a training image of the target class is at distance 0 from itself
    assert nearest_training_distance(x[:4], y[:4], x, y).abs().max() < 1e-12
    res = SimpleNamespace(x=x_cf, x_orig=x_test[:12], target=target)
    assert torch.equal(nearest_training_distance(res, x_train=x, y_train=y), got)
    with pytest.raises(InputError, match="target class 9"):
        nearest_training_distance(x_cf[:1], torch.tensor([9]), x[y < 9], y[y < 9])


def test_im1_formula_and_result_input(digits, class_aes):
    _, _, x_test, y_test = digits
    x = x_test[:8]
    t, o = torch.full((8,), 3), y_test[:8]
    with torch.no_grad():
        want = torch.stack([((x[r] - class_aes[3](x[r:r + 1])[0]) ** 2).sum()
                            / (((x[r] - class_aes[int(o[r])](x[r:r + 1])[0]) ** 2).sum() + 1e-8)
                            for r in range(8)])
    got = im1(x, t, o, class_aes)
    assert got.shape == (8,) and torch.allclose(got.float(), want, rtol=1e-5)
    probs = torch.nn.functional.one_hot(o, 10).float()
    res = SimpleNamespace(x=x, x_orig=x, target=t, probs_before=probs, valid=torch.ones(8, dtype=torch.bool))
    assert torch.allclose(im1(res, ae_by_class=class_aes), got)
    with pytest.raises(InputError, match="no autoencoder for class 3"):
        im1(x, t, o, {c: ae for c, ae in class_aes.items() if c != 3})
    with pytest.raises(InputError, match="ae_by_class"):
        im1(x, t, o)


def test_im1_is_low_for_real_digits_of_the_target_class(digits, class_aes):
    """Closed-form sanity: a real digit of class t scored with target t (original o) has IM1 < 1;
    a real digit of class o scored with the same (t, o) has IM1 > 1."""
    _, _, x_test, y_test = digits
    wins, pairs = 0, 0
    low, high = [], []
    for t in range(10):
        for o in range(10):
            if t == o:
                continue
            real_t, real_o = x_test[y_test == t], x_test[y_test == o]
            a = im1(real_t, torch.tensor(t), torch.tensor(o), class_aes).median()
            b = im1(real_o, torch.tensor(t), torch.tensor(o), class_aes).median()
            low.append(float(a))
            high.append(float(b))
            wins += int(a < 1 < b)
            pairs += 1
    print(f"IM1 medians: real target-class digits {torch.tensor(low).median():.3f}, "
          f"real original-class digits {torch.tensor(high).median():.3f}; a < 1 < b in {wins}/{pairs} pairs")
    assert wins >= 0.95 * pairs


def test_im2_formula(digits, class_aes):
    x, _, x_test, y_test = digits
    ae = fit_prior(x, epochs=5, progress=False)
    xb, t = x_test[:5], y_test[:5]
    with torch.no_grad():
        want = torch.stack([((class_aes[int(t[r])](xb[r:r + 1]) - ae(xb[r:r + 1])) ** 2).sum()
                            / (xb[r].abs().sum() + 1e-8) for r in range(5)])
    assert torch.allclose(im2(xb, t, class_aes, ae).float(), want, rtol=1e-5)
