import os

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
