import pytest
import torch
from torch import nn

from counterlens.errors import InputError
from counterlens.models import (ARCHITECTURES, VOLUME_ARCHITECTURES, PlainCNN, brain_tumor_cnn, build_model,
                                pneumonia_cnn, small_resnet)

N_CLASSES = {"pneumonia-cnn": 2, "brain-tumor-cnn": 4, "small-resnet": 2, "chest-findings-cnn": 3}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


PLANAR = sorted(set(ARCHITECTURES) - set(VOLUME_ARCHITECTURES))   # 2-D by an int or 2-tuple input_size


@pytest.mark.parametrize("name", sorted(VOLUME_ARCHITECTURES))
def test_volume_architectures(name):
    net = build_model(name, num_classes=3, input_size=(16, 24, 20), width=0.25).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 16, 24, 20))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", PLANAR)
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(name, size, channels):
    net = build_model(name, in_channels=channels, input_size=size, width=0.25).eval()
    with torch.no_grad():
        out = net(torch.rand(2, channels, size, size))
    assert out.shape == (2, N_CLASSES[name])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", PLANAR)
def test_num_classes_and_tuple_size(name):
    net = build_model(name, num_classes=5, input_size=(64, 48), width=0.25).eval()
    with torch.no_grad():
        assert net(torch.rand(3, 1, 64, 48)).shape == (3, 5)


def test_3d_and_1d():
    with torch.no_grad():
        assert small_resnet(input_size=(16, 16, 16), width=0.25)(torch.rand(2, 1, 16, 16, 16)).shape == (2, 2)
        assert pneumonia_cnn(input_size=(64,), width=0.25)(torch.rand(2, 1, 64)).shape == (2, 2)


def test_parameter_counts():
    # the published numbers at width 1 and 128x128 (the first dense layer dominates the plain CNNs)
    p = pneumonia_cnn()
    assert n_params(p) == (1 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 128 + 128) \
        + (128 * 16 * 16 * 512 + 512) + (512 * 2 + 2)
    b = brain_tumor_cnn()
    assert n_params(b) == (9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + (128 * 9 * 128 + 128) \
        + (128 * 32 * 32 * 64 + 64) + (64 * 4 + 4)
    r = small_resnet()
    assert 50_000 < n_params(r) < 120_000
    assert n_params(small_resnet(input_size=64)) == n_params(r)  # size-independent
    assert n_params(pneumonia_cnn(width=0.5)) < n_params(p) / 3
    assert pneumonia_cnn(width=0.01).features[0].out_channels == 4  # at least 4 channels


def test_structure():
    for net in (pneumonia_cnn(input_size=32), brain_tumor_cnn(input_size=32)):
        assert isinstance(net, PlainCNN)
        assert isinstance(net.features, nn.Sequential) and isinstance(net.classifier, nn.Sequential)
        relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
        assert relus and not any(m.inplace for m in relus)
        assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in net.classifier)
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        assert all(c.padding == (1, 1) and c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in pneumonia_cnn().features if isinstance(c, nn.Conv2d)] == [32, 64, 128]
    assert [c.out_channels for c in brain_tumor_cnn().features if isinstance(c, nn.Conv2d)] == [32, 64, 128, 128]
    res = small_resnet()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in res.modules()) >= 7
    assert not isinstance(res.layer1.shortcut, nn.Sequential) and isinstance(res.layer2.shortcut, nn.Sequential)


def test_errors():
    with pytest.raises(InputError, match="brain-tumor-cnn, brain-tumor-cnn3d, .*pneumonia-cnn, small-resnet"):
        build_model("vgg16")
    with pytest.raises(InputError, match="unexpected keyword"):
        build_model("small-resnet", depth=50)
    assert isinstance(build_model("Small_ResNet"), nn.Module)  # spelling tolerated
    with pytest.raises(InputError, match="at least 16"):
        small_resnet(input_size=8)
    with pytest.raises(InputError, match="input_size"):
        pneumonia_cnn(input_size=(4, 4))
    net = pneumonia_cnn(input_size=64, width=0.25)
    with pytest.raises(InputError, match=r"input_size=\[64, 64\]"):
        net(torch.rand(1, 1, 128, 128))
    with pytest.raises(InputError, match="num_classes"):
        small_resnet(num_classes=0)


def test_scriptable_and_exportable():
    net = brain_tumor_cnn(input_size=32, width=0.25).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(net)(x), net(x))
        assert torch.allclose(torch.export.export(net, (x,)).module()(x), net(x))
