"""Synthetic brain-MRI and chest-X-ray sets: determinism, layout, masks, shortcut, anatomy."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from counterlens.data.synthetic import (
    CLASSES,
    KINDS,
    SyntheticSet,
    generate,
    make_dataset,
    write_dataset,
)
from counterlens.errors import InputError

BRAIN, CHEST = "brain-mri", "chest-xray"


@pytest.fixture(scope="module")
def brain():
    return generate(BRAIN, 200, size=64, seed=1)


@pytest.fixture(scope="module")
def chest():
    return generate(CHEST, 400, size=64, seed=1, shortcut_rate=0.9)


def assert_same(a: SyntheticSet, b: SyntheticSet):
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.names == b.names and a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("kind", KINDS)
def test_same_arguments_give_bitwise_identical_sets(kind):
    rate = 0.8 if kind == CHEST else None
    assert_same(generate(kind, 40, size=48, seed=7, shortcut_rate=rate),
                generate(kind, 40, size=48, seed=7, shortcut_rate=rate))


@pytest.mark.parametrize("kind", KINDS)
def test_seed_and_split_change_the_images(kind):
    base = generate(kind, 20, size=48, seed=0)
    assert not np.array_equal(base.images, generate(kind, 20, size=48, seed=1).images)
    test = generate(kind, 20, size=48, seed=0, split="test")
    assert not np.array_equal(base.images, test.images)
    assert all(n.startswith("test_") for n in test.names) and all(n.startswith("train_") for n in base.names)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [32, 64, 100])
def test_shapes_dtypes_and_value_range(kind, size):
    d = generate(kind, 9, size=size, seed=3)
    assert len(d) == 9 and d.kind == kind and d.split == "train" and d.classes == CLASSES[kind]
    assert d.images.dtype == np.float32 and d.images.shape == (9, 1, size, size)
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0 and np.isfinite(d.images).all()
    assert d.labels.dtype == np.int64 and d.labels.shape == (9,)
    assert set(d.masks) == ({"tumor", "head", "brain"} if kind == BRAIN else {"opacity", "lungs", "marker"})
    for m in d.masks.values():
        assert m.dtype == bool and m.shape == (9, size, size)
    assert len(set(d.names)) == 9
    assert all(name.split("_")[1] == d.classes[c] for name, c in zip(d.names, d.labels))


def test_class_order_and_balance():
    assert CLASSES[BRAIN] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert CLASSES[CHEST] == ["normal", "pneumonia"]
    assert np.bincount(generate(BRAIN, 10, size=32).labels).tolist() == [3, 3, 2, 2]
    assert np.bincount(generate(CHEST, 101, size=32).labels).tolist() == [51, 50]
    labels = generate(BRAIN, 400, size=32).labels
    assert np.bincount(labels).tolist() == [100] * 4 and not np.all(labels[:4] == [0, 1, 2, 3])  # shuffled
    weighted = generate(CHEST, 100, size=32, class_balance=[3, 1]).labels
    assert np.bincount(weighted).tolist() == [75, 25]
    assert np.bincount(generate(CHEST, 10, size=32, class_balance={"pneumonia": 1}).labels,
                       minlength=2).tolist() == [0, 10]


def test_tumour_mask_empty_exactly_for_notumor_and_inside_the_head(brain):
    area = brain.masks["tumor"].sum((1, 2))
    notumor = brain.labels == CLASSES[BRAIN].index("notumor")
    assert (area[notumor] == 0).all() and (area[~notumor] >= 10).all()
    assert not (brain.masks["tumor"] & ~brain.masks["head"]).any()
    outside_brain = (brain.masks["tumor"] & ~brain.masks["brain"]).sum((1, 2))
    for name in ("glioma", "pituitary"):            # intra-axial / sellar: inside the brain
        assert (outside_brain[brain.labels == CLASSES[BRAIN].index(name)] == 0).all()
    meningioma = brain.labels == CLASSES[BRAIN].index("meningioma")
    assert (outside_brain[meningioma] > 0).mean() > 0.9   # extra-axial: reaches past the brain surface


def test_tumour_types_sit_where_they_belong(brain):
    size = brain.images.shape[-1]
    for i in np.flatnonzero(brain.labels != CLASSES[BRAIN].index("notumor")):
        ty, tx = np.argwhere(brain.masks["tumor"][i]).mean(0)
        hy, hx = np.argwhere(brain.masks["head"][i]).mean(0)
        name = brain.classes[brain.labels[i]]
        if name == "pituitary":                           # midline, below the centre
            assert abs(tx - hx) < 0.08 * size and ty > hy + 0.1 * size
        else:
            assert np.hypot(tx - hx, ty - hy) > 0.12 * size


def test_brain_slices_look_like_heads(brain):
    img = brain.images[:, 0]
    head, tissue = brain.masks["head"], brain.masks["brain"] & ~brain.masks["tumor"]
    assert img[~head].mean() < 0.08                                  # dark background with noise
    assert img[~head].std() > 0.005
    # the ring outside the brain (scalp, skull, CSF) has a bright scalp layer and a dark gap
    ring = head & ~brain.masks["brain"]
    bright = np.array([np.percentile(img[i][ring[i]], 90) for i in range(len(img))])
    dark = np.array([np.percentile(img[i][ring[i]], 10) for i in range(len(img))])
    tissue_mean = np.array([img[i][tissue[i]].mean() for i in range(len(img))])
    assert (bright > tissue_mean + 0.1).mean() > 0.95 and (dark < tissue_mean - 0.1).mean() > 0.95
    assert 0.25 < img[tissue].mean() < 0.75
    assert np.median([img[i][tissue[i]].std() for i in range(len(img))]) > 0.04   # textured, not flat


def test_opacity_mask_empty_exactly_for_normal_and_inside_the_lungs(chest):
    opacity, lungs = chest.masks["opacity"], chest.masks["lungs"]
    area = opacity.sum((1, 2))
    assert (area[chest.labels == 0] == 0).all() and (area[chest.labels == 1] >= 10).all()
    assert (opacity & lungs).sum() >= 0.9 * opacity.sum()
    pneumonia = chest.labels == 1
    assert chest.images[:, 0][opacity].mean() > chest.images[:, 0][lungs & ~opacity][:100000].mean() + 0.05
    for i in range(0, len(chest), 50):                    # two lung fields, one per side
        _, count = ndimage.label(lungs[i])
        assert count == 2
    assert pneumonia.sum() == 200


def test_chest_films_have_dark_lungs_and_bright_mediastinum(chest):
    img, lungs = chest.images[:, 0], chest.masks["lungs"]
    size = img.shape[-1]
    centre = img[:, size // 4: 3 * size // 5, size // 2 - size // 32: size // 2 + size // 32]  # mediastinum
    below = img[:, int(0.85 * size):, size // 4: 3 * size // 4]                            # abdomen
    assert img[lungs].mean() + 0.15 < centre.mean()
    assert img[lungs].mean() + 0.15 < below.mean()
    assert 0.15 < img[lungs].mean() < 0.45


def test_shortcut_marker_agrees_with_label_at_the_requested_rate_in_train_only(chest):
    marked = chest.masks["marker"].any((1, 2))
    assert abs((marked == (chest.labels == 1)).mean() - 0.9) <= 0.05
    test = generate(CHEST, 400, size=64, seed=1, split="test", shortcut_rate=0.9)
    test_marked = test.masks["marker"].any((1, 2))
    assert abs(test_marked.mean() - 0.5) <= 0.05
    assert abs((test_marked == (test.labels == 1)).mean() - 0.5) <= 0.05
    for c in (0, 1):                                    # independent of the label
        assert abs(test_marked[test.labels == c].mean() - 0.5) <= 0.05


def test_marker_mask_is_exactly_where_the_marker_was_drawn_and_bright():
    with_markers = generate(CHEST, 60, size=64, seed=2, shortcut_rate=0.7)
    without = generate(CHEST, 60, size=64, seed=2)
    assert not without.masks["marker"].any()
    changed = with_markers.images[:, 0] != without.images[:, 0]
    marker = with_markers.masks["marker"]
    assert not (changed & ~marker).any()                 # only marker pixels differ
    assert np.array_equal(changed.any((1, 2)), marker.any((1, 2)))
    assert marker.any((1, 2)).sum() >= 20
    assert with_markers.images[:, 0][marker].min() > 0.85
    assert np.array_equal(with_markers.labels, without.labels)


def test_subset_keeps_items_aligned(brain):
    idx = np.array([5, 0, 17])
    sub = brain.subset(idx)
    assert len(sub) == 3 and sub.names == [brain.names[i] for i in idx]
    assert np.array_equal(sub.images, brain.images[idx]) and np.array_equal(sub.labels, brain.labels[idx])
    assert np.array_equal(sub.masks["tumor"], brain.masks["tumor"][idx])
    assert len(brain.subset(brain.labels == 0)) == (brain.labels == 0).sum()
    assert brain.subset(slice(0, 4)).names == brain.names[:4]


def test_write_dataset_layout_and_round_trip(tmp_path):
    sets = make_dataset(CHEST, n_train=6, n_test=4, size=40, seed=5, shortcut_rate=0.5)
    out = write_dataset(sets, tmp_path / "cxr")
    assert out == tmp_path / "cxr"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["kind"] == CHEST and meta["classes"] == CLASSES[CHEST] and meta["size"] == 40
    assert meta["seed"] == 5 and meta["shortcut_rate"] == 0.5
    assert meta["counts"] == {"train": {"normal": 3, "pneumonia": 3}, "test": {"normal": 2, "pneumonia": 2}}
    assert meta["masks"] == ["opacity", "lungs", "marker"]
    assert meta["generator"] == "counterlens.data.synthetic"
    for split, folder in (("train", "Training"), ("test", "Testing")):
        s = sets[split]
        assert len(list((out / folder).rglob("*.png"))) == len(s)
        for i, stem in enumerate(s.names):
            png = Image.open(out / folder / s.classes[s.labels[i]] / f"{stem}.png")
            assert png.mode == "L" and png.size == (40, 40)
            assert np.abs(np.asarray(png) / 255.0 - s.images[i, 0]).max() <= 1 / 255
            for name, m in s.masks.items():
                mask = np.asarray(Image.open(out / "masks" / name / f"{stem}.png"))
                assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask == 255, m[i])
    assert len(list((out / "masks" / "lungs").glob("*.png"))) == 10


@pytest.mark.parametrize("call, argument", [
    (lambda: generate("ct", 4), "kind"),
    (lambda: generate(BRAIN, 0), "n"),
    (lambda: generate(BRAIN, 4, size=16), "size"),
    (lambda: generate(CHEST, 4, shortcut_rate=1.5), "shortcut_rate"),
    (lambda: generate(CHEST, 4, shortcut_rate=-0.1), "shortcut_rate"),
    (lambda: generate(BRAIN, 4, shortcut_rate=0.5), "shortcut_rate"),
    (lambda: generate(BRAIN, 4, class_balance=[1, 2]), "class_balance"),
    (lambda: generate(BRAIN, 4, split=""), "split"),
    (lambda: make_dataset(CHEST, n_train=0, n_test=4), "n_train"),
])
def test_bad_arguments_raise_input_error_naming_the_argument(call, argument):
    with pytest.raises(InputError, match=rf"\b{argument}\b") as info:
        call()
    if argument == "kind":
        assert "brain-mri" in str(info.value) and "chest-xray" in str(info.value)
    if argument == "shortcut_rate":
        assert "[0, 1]" in str(info.value) or "chest-xray" in str(info.value)
