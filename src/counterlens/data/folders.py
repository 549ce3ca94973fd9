"""Image folders as in-memory tensors: every image of an :class:`~counterlens.data.images.ImageFolder`
at once, and a dataset root's training and test splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

__all__ = ["load_arrays", "split_folders"]


def load_arrays(dataset, progress: bool = False, labels: bool = True):
    """Every image of an ImageFolder in memory: ``x [N, C, *S]`` float32 and, with ``labels``,
    ``y [N]`` int64 (then every image must have a label); of a multi-label folder (``labels.csv``)
    ``y [N, K]`` int64, 1 / 0 / -1 (unknown) per finding."""
    from tqdm.auto import tqdm
    images, ys = [], []
    for i in tqdm(range(len(dataset)), desc=f"loading {dataset.root.name}", unit="img", disable=not progress):
        image, label, _ = dataset.load(i)
        if labels and label is None:
            raise InputError(f"{dataset.root}: training needs labels; put images in class subfolders")
        images.append(image)
        ys.append(label)
    x = torch.from_numpy(np.stack(images))
    if labels and getattr(dataset, "multilabel", False):
        return x, torch.tensor(ys, dtype=torch.long).reshape(len(ys), len(dataset.classes))
    return (x, torch.tensor(ys, dtype=torch.long)) if labels else x


def split_folders(root: Path) -> tuple[Path, Path | None]:
    """``(train_dir, test_dir)``: ``Training``/``Testing`` (or train/test) subfolders when present."""
    for train_name, test_name in (("Training", "Testing"), ("train", "test")):
        if (root / train_name).is_dir():
            return root / train_name, (root / test_name) if (root / test_name).is_dir() else None
    return root, None
