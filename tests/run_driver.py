"""A dataset run in a process of its own, for the kill -9 and two-writer tests (tests/test_store.py,
tests/test_faults.py).

``python run_driver.py DATA RUN WORKERS [explain|counterfactual]``: explains DATA into RUN (or
searches counterfactuals) with the seeded tiny CNN, one torch thread per worker, so every process
computes bit-identical results.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyCNN  # noqa: E402

import counterlens as cl  # noqa: E402
from counterlens.data.images import ImageFolder  # noqa: E402
from counterlens.runs.dataset import counterfactual_folder, explain_folder  # noqa: E402

SIZE = 48
METHODS = ["gradcam", "integrated_gradients", "smoothgrad"]
PARAMS = {"integrated_gradients": {"steps": 48}, "smoothgrad": {"samples": 24}}


def classifier():
    torch.manual_seed(0)
    return cl.Classifier(TinyCNN(n_classes=2, size=SIZE), preprocess=cl.Normalize([0.5], [0.25]), classes=["a", "b"],
                         device="cpu", input_size=(SIZE, SIZE), value_range=(0, 1))


def run(data, out, workers: int = 1, images_per_batch: int = 4):
    clf = classifier()
    ds = ImageFolder(data, channels=1, size=SIZE, classes=clf.classes)
    return explain_folder(clf, ds, out, methods=METHODS, params=PARAMS, images_per_batch=images_per_batch,
                          workers=workers, threads=1, progress=False, model_source="tiny-cnn")


def run_counterfactual(data, out, workers: int = 1, images_per_batch: int = 4):
    clf = classifier()
    ds = ImageFolder(data, channels=1, size=SIZE, classes=clf.classes)
    return counterfactual_folder(clf, ds, out, target="other", params={"steps": 60, "seed": 0},
                                 images_per_batch=images_per_batch, workers=workers, threads=1, progress=False,
                                 model_source="tiny-cnn")


if __name__ == "__main__":
    stage = sys.argv[4] if len(sys.argv) > 4 else "explain"
    (run if stage == "explain" else run_counterfactual)(sys.argv[1], sys.argv[2], int(sys.argv[3]))
