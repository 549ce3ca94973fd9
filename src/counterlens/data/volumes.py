"""Seeded synthetic brain-MRI *volumes* with ground-truth 3D masks, written as NIfTI.

``brain-mri-3d`` is the 3D counterpart of the ``brain-mri`` slices (:mod:`counterlens.data.synthetic`):
a head (scalp, skull, CSF, grey and white matter with texture, lateral ventricles, coil bias field,
Rician noise) in a ``[D, H, W]`` grid with D = inferior -> superior (axial slices), H = anterior ->
posterior, W = patient left -> right: the orientation :func:`counterlens.data.images.load_image`
gives any NIfTI file. Four classes, as in the 2D set: ``glioma`` (lobulated intra-axial mass with a
necrotic core, bright rim and oedema), ``meningioma`` (round bright mass on the inner skull),
``notumor`` and ``pituitary`` (small round midline mass low in the head). Masks: ``tumor`` (empty
for ``notumor``), ``head`` and ``brain``.

The field of view is :data:`FIELD_OF_VIEW_MM` on every axis, so a ``shape`` of ``(24, 48, 48)`` gives
anisotropic voxels (8.33 mm slices of 4.17 mm pixels): :attr:`VolumeSet.spacing` says it, and the
NIfTI files carry it. Output is bitwise identical for identical arguments (chunks of volumes, each
with its own RNG derived from (seed, split, chunk index)).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import _anatomy as A

KIND = "brain-mri-3d"
CLASSES = list(A.BRAIN_CLASSES)
MASKS = ("tumor", "head", "brain")
FIELD_OF_VIEW_MM = 200.0             #: side of the (cubic) field of view on every axis
VOXELS_PER_CHUNK = 1 << 21           #: volumes are drawn in chunks of about this many voxels
SPLIT_DIRS = {"train": "Training", "test": "Testing"}
F32 = np.float32


@dataclass
class VolumeSet:
    """N synthetic volumes of one split.

    images: float32 [N, 1, D, H, W] in [0, 1]; labels: int64 [N] indexing ``classes``;
    masks: name -> bool [N, D, H, W]; names: N unique file stems like ``test_glioma_00012``;
    spacing: voxel size (D, H, W) in mm.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    masks: dict[str, np.ndarray]
    names: list[str]
    split: str
    spacing: tuple[float, float, float]
    seed: int = 0
    kind: str = KIND

    def __len__(self) -> int:
        return len(self.labels)


def _shape(size) -> tuple[int, int, int]:
    try:
        shape = (int(size),) * 3 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    except (TypeError, ValueError):
        shape = ()
    if isinstance(size, bool) or len(shape) != 3 or min(shape) < 8:
        raise InputError(f"size={size!r}: give an int or (D, H, W), every side at least 8 voxels")
    return shape


def _smooth(rng, b: int, shape, nodes: int) -> np.ndarray:
    """[b, D, H, W] smooth Gaussian random field of unit variance (``nodes`` control points an axis)."""
    w = [A._upsampler(n, nodes)[0] for n in shape]               # [n, nodes] each, rows of unit norm
    g = rng.standard_normal((b, nodes, nodes, nodes), dtype=F32)
    g = np.einsum("bijk,xk->bijx", g, w[2])
    g = np.einsum("bijx,yj->biyx", g, w[1])
    return np.einsum("biyx,zi->bzyx", g, w[0])


def _grid(shape):
    """Voxel-centre coordinates in [-1, 1]: z [1, D, 1, 1], y [1, 1, H, 1], x [1, 1, 1, W]."""
    axes = [((np.arange(n, dtype=F32) + 0.5) / n * 2 - 1) for n in shape]
    return axes[0].reshape(1, -1, 1, 1), axes[1].reshape(1, 1, -1, 1), axes[2].reshape(1, 1, 1, -1)


def _p(rng, b, lo, hi):
    return rng.uniform(lo, hi, (b, 1, 1, 1)).astype(F32)


def render_volumes(labels: np.ndarray, rng: np.random.Generator, shape) -> tuple[np.ndarray, dict]:
    """labels [B] -> volumes float32 [B, D, H, W] in [0, 1] and masks tumor/head/brain [B, D, H, W]."""
    b = len(labels)
    z, y, x = _grid(shape)
    px = F32(2.0 / min(shape))
    th = _p(rng, b, -0.15, 0.15)
    dz, dy, dx = z - _p(rng, b, -0.04, 0.08), y - _p(rng, b, -0.05, 0.05), x - _p(rng, b, -0.05, 0.05)
    ax, az = _p(rng, b, 0.70, 0.78), _p(rng, b, 0.74, 0.82)
    ay = ax * _p(rng, b, 1.12, 1.2)
    U = (np.cos(th) * dx + np.sin(th) * dy) / ax           # left-right, rotated about the axial axis
    V = (np.cos(th) * dy - np.sin(th) * dx) / ay           # front-back
    W = dz / az                                            # down-up
    U = U / (1 + 0.07 * V)                                 # egg shape: wider at the back
    r = np.sqrt(U * U + V * V + W * W)
    t2 = rng.random((b, 1, 1, 1)) < 0.3
    tab = {k: np.where(t2, F32(A._T2[k]), F32(A._T1[k])) * _p(rng, b, 0.92, 1.06) for k in A._T1}

    depth = A.R_BRAIN - r
    fold = _smooth(rng, b, shape, 9)
    wm = np.clip((depth - 0.13 + 0.04 * fold) / 0.03 + 0.5, 0, 1)
    tissue = tab["gm"] + (tab["wm"] - tab["gm"]) * wm
    tissue *= 1 + 0.05 * _smooth(rng, b, shape, 14)
    A.lerp_(tissue, 0.8 * np.clip(1.2 - np.abs(fold) / 0.25, 0, 1) * np.clip(1.2 - depth / 0.1, 0, 1), tab["csf"])
    vs = _p(rng, b, 0.8, 1.3)                               # lateral ventricles: two ellipsoids
    vent = ((np.abs(U) - 0.12 * vs) / (0.06 * vs)) ** 2 + ((V - 0.02) / 0.3) ** 2 + ((W - 0.12) / 0.16) ** 2
    A.lerp_(tissue, A.ramp(vent - 1, 0.3), tab["csf"])

    out = tab["csf"] * A.ramp(r - A.R_BONE, px)
    A.lerp_(out, A.ramp(r - A.R_BRAIN, px), tissue)
    A.lerp_(out, A.ramp(A.R_BONE - r, px) * A.ramp(r - A.R_SCALP, px), tab["bone"])
    A.lerp_(out, A.ramp(A.R_SCALP - r, px) * A.ramp(r - 1, px), tab["scalp"] * (1 + 2.5 * (r - 1)))
    out *= A.ramp(r - 1, px)
    tumor = np.zeros((b, *shape), bool)
    for cls in (0, 1, 3):
        sel = np.flatnonzero(labels == cls)
        if len(sel):
            geo = (U[sel], V[sel], W[sel], r[sel], ax[sel], ay[sel], az[sel])
            out[sel], tumor[sel] = _tumour(cls, out[sel], rng, shape, geo, {k: t[sel] for k, t in tab.items()})
    out *= 1 + 0.1 * _smooth(rng, b, shape, 3)              # coil bias field
    sigma = _p(rng, b, 0.015, 0.035)
    re, im = A.white_noise(rng, out.shape, sigma), A.white_noise(rng, out.shape, sigma)
    out = np.sqrt((out + re) ** 2 + im * im)                # Rician magnitude
    np.clip(out, 0, 1, out=out)
    return out.astype(F32, copy=False), {"tumor": tumor, "head": r < 1, "brain": r < A.R_BRAIN}


def _tumour(cls, img, rng, shape, geo, T):
    """Draw one tumour of class ``cls`` into the n volumes ``img``; returns (img, mask)."""
    U, V, W, r, ax, ay, az = geo
    n = len(img)
    if cls == 0:    # glioma: lobulated intra-axial mass in one hemisphere
        side = np.where(rng.random((n, 1, 1, 1)) < 0.5, F32(-1), F32(1))
        tu, tv, tw = side * _p(rng, n, 0.25, 0.4), _p(rng, n, -0.3, 0.3), _p(rng, n, -0.1, 0.35)
        rad = _p(rng, n, 0.24, 0.32)
    elif cls == 1:  # meningioma: on the inner skull, upper half of the head
        direction = rng.standard_normal((n, 3)).astype(F32)
        direction[:, 2] = np.abs(direction[:, 2]) + 0.3
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        rad = _p(rng, n, 0.2, 0.26)
        rc = A.R_BONE - 0.45 * rad / ax
        tu, tv, tw = (rc * direction[:, k].reshape(n, 1, 1, 1) for k in range(3))
    else:           # pituitary: small, midline, low and forward
        tu, tv, tw = _p(rng, n, -0.03, 0.03), _p(rng, n, -0.15, -0.05), _p(rng, n, -0.5, -0.4)
        rad = _p(rng, n, 0.13, 0.17)
    d = np.sqrt(((U - tu) * ax) ** 2 + ((V - tv) * ay) ** 2 + ((W - tw) * az) ** 2) / rad
    pxr = F32(2.0 / min(shape)) / rad
    if cls == 0:
        lob = _smooth(rng, n, shape, 7)
        d = d * (1 + 0.18 * lob)
        inside = A.ramp(r - A.R_BRAIN + 0.02, pxr)
        img *= 1 + (T["edema"] - 1) * np.clip((1.7 - d) / 0.5, 0, 1) * inside
        core = A.ramp(d - 1, pxr) * inside
        val = T["rim"] * (1 + 0.06 * lob)
        A.lerp_(val, A.ramp(d - _p(rng, n, 0.45, 0.7), 2 * pxr), T["necro"])
    else:
        core = A.ramp(d - 1, pxr) * A.ramp(r - A.R_BONE, pxr)
        A.lerp_(img, 0.6 * np.clip(1 - np.abs(d - 1.1) / 0.1, 0, 1) * (r < A.R_BRAIN), T["csf"])
        val = T["menin"] if cls == 1 else T["pit"]
    A.lerp_(img, core, val)
    return img, core > 0.5


def generate_volumes(n: int, *, size=32, seed: int = 0, split: str = "train") -> VolumeSet:
    """``n`` volumes (classes balanced round robin, shuffled with the seed) of ``size`` (an int for a
    cube, or (D, H, W)); float32 in [0, 1]. The RNG is derived from (seed, split)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n={n!r}: give a positive number of volumes")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed={seed!r}: give an integer >= 0")
    if not isinstance(split, str) or not split.replace("-", "").isalnum():
        raise InputError(f"split={split!r}: give 'train', 'test' or another name of letters, digits and '-'")
    shape = _shape(size)
    split_id = zlib.crc32(split.encode())
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(3, split_id, 0)))
    labels = rng.permutation(np.arange(int(n)) % len(CLASSES)).astype(np.int64)
    chunk = max(1, VOXELS_PER_CHUNK // int(np.prod(shape)))
    images = np.empty((n, 1, *shape), F32)
    masks = {m: np.empty((n, *shape), bool) for m in MASKS}
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        crng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(3, split_id, 1 + start // chunk)))
        vol, m = render_volumes(labels[start:stop], crng, shape)
        images[start:stop, 0] = vol
        for name in MASKS:
            masks[name][start:stop] = m[name]
    width = max(5, len(str(n - 1)))
    names = [f"{split}_{CLASSES[c]}_{i:0{width}d}" for i, c in enumerate(labels)]
    spacing = tuple(FIELD_OF_VIEW_MM / s for s in shape)
    return VolumeSet(images, labels, list(CLASSES), masks, names, split, spacing, int(seed))


def make_volume_dataset(*, n_train: int, n_test: int, size=32, seed: int = 0) -> dict[str, VolumeSet]:
    """``{"train": generate_volumes(n_train, split="train"), "test": generate_volumes(n_test, split="test")}``."""
    return {split: generate_volumes(k, size=size, seed=seed, split=split)
            for split, k in (("train", n_train), ("test", n_test))}


def nifti_affine(spacing) -> np.ndarray:
    """The RAS affine of a ``[D, H, W]`` volume stored as :func:`write_nifti` stores it, centred on 0."""
    sz, sy, sx = (float(s) for s in spacing)
    return np.array([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]], dtype=np.float64)


def write_nifti(volume: np.ndarray, path, spacing=(1.0, 1.0, 1.0), *, unit: bool = True) -> Path:
    """Write ``volume [D, H, W]`` (D inferior -> superior, H anterior -> posterior, W left -> right)
    so that :func:`counterlens.data.images.load_image` reads it back in the same orientation.

    ``unit``: values in [0, 1] stored as uint8 with scl_slope 1/255 (a quarter of float32's size;
    read back quantised to 1/255); bool volumes are stored as 0/1 uint8; otherwise float32.
    ``spacing``: voxel size (D, H, W) in mm. ``.nii.gz`` names are gzip-compressed.
    """
    import nibabel as nib

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise InputError(f"volume has shape {vol.shape}; write_nifti takes [D, H, W]")
    data = vol[:, ::-1, :].transpose(2, 1, 0)                # (S, P, R) -> (R, A, S) voxel order
    if vol.dtype == bool:
        img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), nifti_affine(spacing))
    elif unit:
        q = np.round(np.clip(data, 0, 1) * 255).astype(np.uint8)
        img = nib.Nifti1Image(np.ascontiguousarray(q), nifti_affine(spacing))
        img.header.set_slope_inter(1 / 255.0, 0.0)
    else:
        img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), nifti_affine(spacing))
    img.header.set_xyzt_units("mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_volume_dataset(sets: dict[str, VolumeSet], out_dir) -> Path:
    """Write sets as ``Training/<class>/<stem>.nii.gz``, ``Testing/<class>/<stem>.nii.gz``,
    ``masks/<mask>/<stem>.nii.gz`` and ``dataset.json`` (kind, classes, shape, spacing, seed, counts)."""
    if not isinstance(sets, dict) or not sets or not all(isinstance(s, VolumeSet) for s in sets.values()):
        raise InputError("sets must be a non-empty dict split -> VolumeSet (as make_volume_dataset returns)")
    out = Path(out_dir)
    for split, s in sets.items():
        top = out / SPLIT_DIRS.get(split, split.capitalize())
        for c in s.classes:
            (top / c).mkdir(parents=True, exist_ok=True)
        for i, stem in enumerate(s.names):
            write_nifti(s.images[i, 0], top / s.classes[s.labels[i]] / f"{stem}.nii.gz", s.spacing)
        for name, m in s.masks.items():
            (out / "masks" / name).mkdir(parents=True, exist_ok=True)
            for i, stem in enumerate(s.names):
                write_nifti(m[i], out / "masks" / name / f"{stem}.nii.gz", s.spacing)
    first = next(iter(sets.values()))
    meta = {"kind": KIND, "classes": list(first.classes), "shape": list(first.images.shape[2:]),
            "spacing_mm": [round(v, 6) for v in first.spacing], "seed": first.seed,
            "orientation": "D inferior->superior, H anterior->posterior, W left->right (RAS NIfTI)",
            "counts": {split: {c: int((s.labels == k).sum()) for k, c in enumerate(s.classes)}
                       for split, s in sets.items()},
            "masks": list(first.masks), "generator": "counterlens.data.volumes"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out
