import os

import numpy as np
import pytest
import torch
from torch import nn

# Under pytest-xdist (make test runs one worker per core) each worker gets one intra-op thread: two
# workers with two OpenMP threads each on 2 cores spin-wait against each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def single_thread():
    """Fixture body for test modules of tiny models: one intra-op thread, restored afterwards.

    Every op is small, so one thread is faster than two, and far faster when other processes share
    the 2 cores (two OpenMP threads on a busy box spin-wait: 20 s instead of 0.1 s for a tiny
    training). Use as ``_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits_cnn() -> nn.Module:
    """conv 16 - ReLU - conv 32 - ReLU - maxpool - dense: the CNN the digits tests train."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))


def fit_digits(net: nn.Module, x, y, epochs: int, lr: float = 3e-3) -> nn.Module:
    """Adam on ``(x, y)`` in batches of 64, order seeded; the net in eval mode with no gradients left."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.grad = None
    return net


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


class TinyCNN(nn.Module):
    """A small 2D/3D CNN with in-place ReLU, max-pool, dropout and a dense head."""

    def __init__(self, in_channels=1, n_classes=3, size=32, dims=2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.features = nn.Sequential(
            conv(in_channels, 8, 3, padding=1), nn.ReLU(inplace=True), pool(2),
            conv(8, 16, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5),
                                        nn.Linear(16 * (size // 2) ** dims, n_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture(scope="session")
def digits():
    """sklearn's digits (real, 8x8) scaled to [0, 1] as ``[N, 1, 8, 8]``, split 1437 / 360 with seed 0:
    ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    return x[tr], y[tr], x[te], y[te]
