import pytest
import torch
from conftest import single_thread

from counterlens.errors import InputError
from counterlens.model import Classifier, Normalize
from counterlens.models import pneumonia_cnn, small_resnet
from counterlens.training import evaluate_accuracy, random_flip_shift, train_classifier

_one_thread = pytest.fixture(autouse=True)(single_thread)


def easy_task(n, seed):
    """Class 1 has a bright square in the left half, class 0 in the right half (16x16, noisy)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, 16, 16, generator=g)
    rows = torch.randint(0, 12, (n,), generator=g)
    cols = torch.randint(0, 4, (n,), generator=g) + torch.where(y == 1, 0, 8)
    for i in range(n):
        x[i, 0, rows[i]:rows[i] + 4, cols[i]:cols[i] + 4] += 0.8
    return x, y


def tiny():
    return pneumonia_cnn(num_classes=2, input_size=16, width=0.125)


def test_deterministic():
    x, y = easy_task(40, 0)
    kw = dict(epochs=2, batch_size=8, seed=3, progress=False, augment=random_flip_shift(max_shift=0.125),
              preprocess=Normalize([0.5], [0.5]), device="cpu")
    a = train_classifier(tiny, x, y, **kw)["module"]
    b = train_classifier(tiny, x, y, **kw)["module"]
    c = train_classifier(tiny, x, y, **{**kw, "seed": 4})["module"]
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # a module built by the caller under the same seed trains to the same weights
    torch.manual_seed(123)
    m1 = tiny()
    torch.manual_seed(123)
    m2 = tiny()
    train_classifier(m1, x, y, **kw)
    train_classifier(m2, x, y, **kw)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_caller_rng_untouched():
    x, y = easy_task(16, 0)
    m = tiny()
    state = torch.random.get_rng_state()
    train_classifier(m, x, y, epochs=1, batch_size=8, progress=False, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_accuracy_rises_and_eval_mode():
    x, y = easy_task(256, 1)
    xv, yv = easy_task(128, 2)
    lines = []
    torch.manual_seed(0)
    net = small_resnet(input_size=16, width=0.5)
    result = train_classifier(net, x, y, x_val=xv, y_val=yv, epochs=6, batch_size=32, lr=3e-3,
                              seed=0, progress=False, device="cpu", log=lines.append)
    hist = result["history"]
    assert len(hist["loss"]) == 6 and len(lines) == 6 and "val acc" in lines[0]
    assert hist["loss"][-1] < hist["loss"][0]
    assert result["val_acc"] >= 0.9 and result["val_acc"] == hist["val_acc"][-1]
    assert result["module"] is net and not any(m.training for m in net.modules())
    assert all(s > 0 for s in hist["seconds"])
    assert evaluate_accuracy(net, xv, yv) == pytest.approx(result["val_acc"])
    assert evaluate_accuracy(Classifier(net, device="cpu"), xv, yv) == pytest.approx(result["val_acc"])


def test_evaluate_accuracy_restores_mode():
    x, y = easy_task(8, 0)
    net = tiny().train()
    evaluate_accuracy(net, x, y, batch_size=3, preprocess=Normalize([0.5], [0.5]))
    assert all(m.training for m in net.modules())


def test_classifier_input_uses_its_preprocess():
    x, y = easy_task(16, 0)
    torch.manual_seed(0)
    clf = Classifier(tiny(), preprocess=Normalize([0.5], [0.5]), device="cpu")
    torch.manual_seed(0)
    plain = tiny()
    r1 = train_classifier(clf, x, y, epochs=1, batch_size=8, progress=False, device="cpu")
    train_classifier(plain, x, y, epochs=1, batch_size=8, progress=False, device="cpu",
                     preprocess=Normalize([0.5], [0.5]))
    assert r1["module"] is clf.module
    assert all(torch.equal(p, q) for p, q in zip(clf.module.parameters(), plain.parameters()))


def test_progress_bar_and_errors():
    x, y = easy_task(17, 0)  # a trailing batch of one row is skipped (BatchNorm)
    net = small_resnet(input_size=16, width=0.25)
    train_classifier(net, x, y, epochs=1, batch_size=8, progress=True, device="cpu")
    with pytest.raises(InputError, match="label 5"):
        train_classifier(tiny(), x, torch.full((17,), 5), epochs=1, progress=False, device="cpu")
    with pytest.raises(InputError, match="one label per row"):
        train_classifier(tiny(), x, y[:3], epochs=1, progress=False, device="cpu")
    with pytest.raises(InputError, match="do not fit"):
        train_classifier(tiny(), torch.rand(4, 1, 32, 32), y[:4], epochs=1, progress=False, device="cpu")
    with pytest.raises(InputError, match="both x_val and y_val"):
        train_classifier(tiny(), x, y, x_val=x, progress=False, device="cpu")
    with pytest.raises(InputError, match="NaN"):
        train_classifier(tiny(), x * float("nan"), y, progress=False, device="cpu")


def test_random_flip_shift_shapes():
    aug = random_flip_shift(flip_axes=(-1, -2), max_shift=0.25)
    x = torch.rand(5, 2, 8, 12)
    torch.manual_seed(0)
    out = aug(x)
    assert out.shape == x.shape
    x3 = torch.rand(2, 1, 8, 8, 8)
    assert aug(x3).shape == x3.shape


def _batchnorm_gap(net, pre, x) -> float:
    """Largest |running mean - the training images' mean| over the BatchNorm layers of ``net``, the
    images' mean taken by hand (hooks, one train-mode pass of every row)."""
    seen = {}
    norms = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [m.register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, inp[0])) for n, m in norms.items()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.train()
        net(pre(x))
        net.eval()
    net.load_state_dict(state)        # that pass moved the running statistics: put them back
    for h in hooks:
        h.remove()
    return max(float((m.running_mean - seen[n].mean((0, 2, 3))).abs().max()) for n, m in norms.items())


def test_batchnorm_statistics_are_the_training_images_own_at_the_end(monkeypatch):
    """After training, every BatchNorm layer's running mean is the training images' own under the
    final weights (by hand, above), not the lagging average of the last steps; training without the
    recalibration gives the same weights and the lagging statistics; no BatchNorm: nothing done."""
    from counterlens import training
    x, y = easy_task(96, 1)
    pre = Normalize([0.5], [0.5])
    kw = dict(epochs=2, batch_size=32, lr=3e-3, seed=0, progress=False, device="cpu", preprocess=pre)
    torch.manual_seed(0)
    net = small_resnet(input_size=16, width=0.5)
    result = train_classifier(net, x, y, **kw)
    assert result["config"]["batchnorm_recalibrated"] is True
    monkeypatch.setattr(training, "_recalibrate_batchnorm", lambda *a: False)
    torch.manual_seed(0)
    lagging = small_resnet(input_size=16, width=0.5)
    train_classifier(lagging, x, y, **kw)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), lagging.parameters()))   # training unchanged
    gap, lag = _batchnorm_gap(net, pre, x), _batchnorm_gap(lagging, pre, x)
    assert gap < 5e-3 and lag > 50 * gap, (gap, lag)   # measured 0.0012 and 0.45 (batches of 32 vs all 96 rows)
    monkeypatch.undo()
    plain = train_classifier(tiny, x, y, epochs=1, batch_size=32, seed=0, progress=False, device="cpu")
    assert plain["config"]["batchnorm_recalibrated"] is False
