"""Vectorised renderers for the synthetic datasets (see :mod:`counterlens.data.synthetic`).

Every renderer draws a *chunk* of B images at once: per-image parameters are arrays of
shape [B, 1, 1] that broadcast against coordinate grids of shape [1, H, W]; results are
float32 [B, H, W] images in [0, 1] and bool [B, H, W] masks. Coordinates are normalised
to [-1, 1] (x to the right, y downwards), so the anatomy scales with the image size.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

F32 = np.float32
BRAIN_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
CHEST_CLASSES = ("normal", "pneumonia")
CHEST_FINDINGS = ("opacity", "effusion", "cardiomegaly")


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x [1, 1, W] and y [1, H, 1]."""
    t = ((np.arange(size, dtype=F32) + 0.5) / size * 2 - 1).astype(F32)
    t.setflags(write=False)
    return t.reshape(1, 1, size), t.reshape(1, size, 1)


@lru_cache(maxsize=32)
def _upsampler(size: int, nodes: int, blocks: int = 1) -> np.ndarray:
    """[blocks, ceil(size / blocks), nodes] Gaussian interpolation weights (rows of unit L2 norm,
    so fields have unit variance), split into row blocks (zero rows pad the last one)."""
    x = (np.arange(size) + 0.5) / size * 2 - 1
    c = np.linspace(-1.2, 1.2, nodes)
    w = np.exp(-0.5 * ((x[:, None] - c[None]) / (0.75 * (c[1] - c[0]))) ** 2)
    w /= np.sqrt((w ** 2).sum(1, keepdims=True))
    rows = -(-size // blocks)
    w = np.concatenate([w, np.zeros((rows * blocks - size, nodes))])
    w = w.reshape(blocks, rows, nodes).astype(F32)
    w.setflags(write=False)
    return w


# OpenBLAS runs a product of m*n*k <= 2**18 on the calling thread; larger ones wake its thread
# pool, which only competes with our own threads for two cores. So products are kept small.
_SMALL_GEMM = 1 << 18


def smooth_noise(rng: np.random.Generator, b: int, size: int, nodes: int, nodes_x: int = 0) -> np.ndarray:
    """[b, size, size] smooth Gaussian random field of unit variance; ``nodes`` sets the detail
    (``nodes_x``, if given, the detail along x: more nodes along x than y gives vertical streaks)."""
    nx = nodes_x or nodes
    t = rng.standard_normal((b, 1, nodes, nx), dtype=F32) @ _upsampler(size, nx)[0].T
    uy = _upsampler(size, nodes, -(-size * size * nodes // _SMALL_GEMM))
    out = (uy @ t).reshape(b, -1, size)                # [b, blocks, rows, size] -> [b, >=size, size]
    return out if out.shape[1] == size else np.ascontiguousarray(out[:, :size])


def ramp(d, soft):
    """Soft inside-indicator of a signed distance ``d`` (negative inside), edge width ``soft``."""
    t = d * (-1.0 / soft)
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


def white_noise(rng, shape, sigma):
    """Zero-mean noise of std ``sigma`` (uniform: 3x cheaper to draw than Gaussian, looks the same)."""
    z = rng.random(shape, dtype=F32)
    z -= 0.5
    z *= F32(12 ** 0.5) * sigma
    return z


def smoothstep(e0, e1, x):
    """0 below ``e0``, 1 above ``e1`` (or the reverse if e1 < e0), smooth in between."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def lerp_(img, weight, value):
    """In place: img <- img + weight * (value - img)."""
    img += weight * (value - img)
    return img


def param(rng, b, lo, hi):
    """Per-image uniform parameter, shape [b, 1, 1] float32."""
    return rng.uniform(lo, hi, (b, 1, 1)).astype(F32)


def _frame(rng, b, size, shift, rot, scale):
    """Per-image jittered local coordinates (u, v) [b, H, W]: shifted, rotated, scaled."""
    x, y = grid(size)
    cx, cy = param(rng, b, -shift, shift), param(rng, b, -shift, shift)
    th = param(rng, b, -rot, rot)
    s = param(rng, b, *scale)
    c, si = np.cos(th) / s, np.sin(th) / s
    dx, dy = x - cx, y - cy
    return c * dx + si * dy, c * dy - si * dx


# --------------------------------------------------------------------------- brain MRI
# tissue intensities for the two contrasts: T1 post-contrast (dark CSF) and T2 (bright CSF)
_T1 = {"scalp": 0.80, "bone": 0.07, "csf": 0.10, "gm": 0.40, "wm": 0.60, "rim": 0.88, "necro": 0.16,
       "edema": 0.72, "menin": 0.86, "pit": 0.84}
_T2 = {"scalp": 0.62, "bone": 0.05, "csf": 0.88, "gm": 0.52, "wm": 0.36, "rim": 0.80, "necro": 0.95,
       "edema": 1.2, "menin": 0.74, "pit": 0.80}
R_BRAIN, R_BONE, R_SCALP = 0.85, 0.89, 0.945   # radii of brain / inner bone / outer bone


def render_brain(labels: np.ndarray, rng: np.random.Generator, size: int):
    """Axial head slices. labels [B] -> images [B, H, W] float32, masks tumor/head/brain [B, H, W]."""
    b = len(labels)
    u, v = _frame(rng, b, size, 0.05, 0.15, (0.95, 1.08))
    a = param(rng, b, 0.70, 0.78)
    bb = a * param(rng, b, 1.12, 1.2)
    U = u / (a * (1 + 0.07 * v))          # egg shape: wider at the back (bottom)
    V = v / bb
    r = np.sqrt(U * U + V * V)
    px = F32(2.0 / size) / a               # one pixel in r units
    t2 = rng.random((b, 1, 1)) < 0.3
    tab = {k: np.where(t2, F32(_T2[k]), F32(_T1[k])) * param(rng, b, 0.92, 1.06) for k in _T1}

    fold = smooth_noise(rng, b, size, 30)
    depth = R_BRAIN - r                     # depth below the brain surface, r units
    sulcus = np.clip(1.3 - np.abs(fold) / 0.22, 0, 1) * np.clip(1.2 - depth / 0.13, 0, 1)
    wm_edge = 0.12 - 0.06 * np.clip(np.abs(fold), 0, 1.4) + 0.03 * smooth_noise(rng, b, size, 7)
    wm = np.clip((depth - wm_edge) / 0.03 + 0.5, 0, 1)
    img = tab["gm"] + (tab["wm"] - tab["gm"]) * wm
    img *= 1 + 0.05 * smooth_noise(rng, b, size, 48) + 0.04 * smooth_noise(rng, b, size, 12)
    lerp_(img, sulcus * 0.85, tab["csf"])
    # deep grey nuclei, interhemispheric fissure and the butterfly-shaped lateral ventricles
    nuc = ((np.abs(U) - 0.2) / 0.08) ** 2 + ((V - 0.08) / 0.14) ** 2
    lerp_(img, 0.7 * ramp(nuc - 1, 1.2), tab["gm"])
    falx = np.clip(1 - np.abs(U) / 0.025, 0, 1) * (smoothstep(-0.25, -0.4, V) + smoothstep(0.45, 0.6, V))
    lerp_(img, falx * 0.8, tab["csf"])
    vs = param(rng, b, 0.8, 1.3)
    vy = V + param(rng, b, 0.0, 0.08)
    off = param(rng, b, 0.06, 0.1) + param(rng, b, 0.4, 1.0) * vy * vy
    width = vs * (0.04 + param(rng, b, 0.02, 0.07) * np.clip(-vy, 0, 0.3))
    vent = ((np.abs(U) - off) / width) ** 2 + (vy / (0.27 * np.sqrt(vs))) ** 2
    lerp_(img, ramp(vent - 1, 0.3), tab["csf"])

    out = tab["csf"] * ramp(r - R_BONE, px)
    lerp_(out, ramp(r - R_BRAIN, px), img)
    diploe = np.clip(1 - np.abs(r - 0.5 * (R_BONE + R_SCALP)) / 0.012, 0, 1) * (0.5 + 0.2 * fold)
    lerp_(out, ramp(R_BONE - r, px) * ramp(r - R_SCALP, px), tab["bone"] + diploe * (tab["gm"] - tab["bone"]))
    lerp_(out, ramp(R_SCALP - r, px) * ramp(r - 1, px), tab["scalp"] * (1 + 2.5 * (r - 1)))
    out *= ramp(r - 1, px)
    tumor = np.zeros((b, size, size), bool)
    for cls in (0, 1, 3):
        sel = np.flatnonzero(labels == cls)
        if len(sel):
            m, tumor[sel] = _brain_tumor(cls, out[sel], rng, size, U[sel], V[sel], r[sel],
                                         a[sel], bb[sel], {k: t[sel] for k, t in tab.items()})
            out[sel] = m
    out *= 1 + 0.12 * smooth_noise(rng, b, size, 4)         # coil bias field
    sigma = param(rng, b, 0.015, 0.035)
    z = white_noise(rng, (b, size + 1, size), sigma)
    out += z[:, 1:]                                          # real and imaginary noise: one draw,
    out = np.sqrt(out * out + z[:, :-1] ** 2)                # shifted a row; Rician magnitude
    np.clip(out, 0, 1, out=out)
    return out, {"tumor": tumor, "head": r < 1, "brain": r < R_BRAIN}


def _brain_tumor(cls, img, rng, size, U, V, r, a, bb, T):
    """Draw one tumour of class ``cls`` into the n images ``img`` [n, H, W]; returns (img, mask)."""
    n = len(img)
    if cls == 0:    # glioma: lobulated intra-axial mass, necrotic core, oedema halo
        side = np.where(rng.random((n, 1, 1)) < 0.5, F32(-1), F32(1))
        psi, rho = param(rng, n, -1.3, 0.6), param(rng, n, 0.34, 0.48)
        tu, tv, rad = side * rho * np.cos(psi), rho * np.sin(psi), param(rng, n, 0.14, 0.22)
    elif cls == 1:  # meningioma: round extra-axial mass on the inner skull
        phi, rad = param(rng, n, 0, 2 * np.pi), param(rng, n, 0.13, 0.21)
        rc = R_BONE - 0.45 * rad / a
        tu, tv = rc * np.cos(phi), rc * np.sin(phi)
    else:           # pituitary: small round midline mass below the ventricles
        tu, tv, rad = param(rng, n, -0.03, 0.03), param(rng, n, 0.34, 0.42), param(rng, n, 0.07, 0.1)
    dx, dy = (U - tu) * a, (V - tv) * bb
    d = np.sqrt(dx * dx + dy * dy) / rad
    pxr = F32(2.0 / size) / rad
    if cls == 0:
        z = (dx + 1j * dy).astype(np.complex64) / (d * rad + 1e-6)   # e^{i angle}
        zk, shape = z, np.ones_like(d)
        for k in range(2, 6):                                      # lobulated outline
            zk = zk * z
            amp = rng.uniform(0, 0.22 / np.sqrt(k - 1), (n, 1, 1))
            amp = amp * np.exp(2j * np.pi * rng.random((n, 1, 1)))
            shape += (zk * amp.astype(np.complex64)).real
        lob = smooth_noise(rng, n, size, 28)
        d = d / np.maximum(shape, 0.4) + 0.08 * lob
        inside = ramp(r - R_BRAIN + 0.02, F32(2.0 / size) / a)
        img *= 1 + (T["edema"] - 1) * np.clip((1.8 + 0.3 * lob - d) / 0.5, 0, 1) * inside
        core = ramp(d - 1, pxr) * inside
        val = T["rim"] * (1 + 0.08 * smooth_noise(rng, n, size, 30))
        lerp_(val, ramp(d - param(rng, n, 0.4, 0.7) - 0.25 * smooth_noise(rng, n, size, 24), 2 * pxr),
              T["necro"])
    else:
        core = ramp(d - 1, pxr) * ramp(r - R_BONE, F32(2.0 / size) / a)
        cleft = np.clip(1 - np.abs(d - 1.08) / 0.07, 0, 1) * (r < R_BRAIN)   # CSF cleft around it
        lerp_(img, 0.6 * cleft, T["csf"])
        val = (T["menin"] if cls == 1 else T["pit"]) * (1 + 0.04 * smooth_noise(rng, n, size, 24))
    lerp_(img, core, val)
    return img, core > 0.5


# --------------------------------------------------------------------------- chest X-ray
_FONT = {  # 5x7 bitmap glyphs of lead side markers
    "L": "10000 10000 10000 10000 10000 10000 11111", "R": "11110 10001 10001 11110 10100 10010 10001",
    "P": "11110 10001 10001 11110 10000 10000 10000", "A": "01110 10001 10001 11111 10001 10001 10001",
    "1": "00100 01100 00100 00100 00100 00100 01110", "2": "01110 10001 00001 00010 00100 01000 11111",
}
_TAGS = ("L", "R", "PA", "AP", "L1", "R2")


def _glyphs(text: str, scale: int) -> np.ndarray:
    """Bool [7 * scale, (6 * len - 1) * scale] bitmap of ``text``."""
    rows = [np.array([[c == "1" for c in row] for row in _FONT[ch].split()]) for ch in text]
    gap = np.zeros((7, 1), bool)
    bm = np.concatenate([x for g in rows for x in (g, gap)][:-1], axis=1)
    return np.kron(bm, np.ones((scale, scale), bool))


def render_chest(labels: np.ndarray, markers: np.ndarray, rng: np.random.Generator, size: int,
                 findings: np.ndarray | None = None):
    """PA chest films. labels, markers [B] -> images [B, H, W], masks opacity/lungs/marker.

    x [B, 1, W] runs to the image right (the patient's left), y [B, H, 1] downwards; terms
    that depend on one of them only stay 1D, so most of the work is on rows and columns.

    ``findings`` (bool [B, 3], columns :data:`CHEST_FINDINGS`): the multi-finding films instead
    of ``labels``: an opacity, a pleural effusion (fluid with a meniscus at a lung base) and an
    enlarged heart, each independently, each with its own mask (``opacity``, ``effusion``,
    ``cardiomegaly``). Without it the random stream is the one of the two-class films.
    """
    b = len(labels)
    if findings is not None:
        labels = findings[:, 0].astype(np.int64)
    gx, gy = grid(size)
    px = F32(2.0 / size)
    scale = param(rng, b, 0.94, 1.06)
    x, y = (gx - param(rng, b, -0.04, 0.04)) / scale, (gy - param(rng, b, -0.04, 0.03)) / scale
    ax_, left = np.abs(x), x > 0

    def sided(lo, hi, shift=0.0):   # per-image parameter, drawn per side, as [B, 1, W]
        return np.where(left, param(rng, b, lo, hi) + shift, param(rng, b, lo, hi))

    # body: chest wall at the sides, shoulders sloping down from the neck
    wall = np.sqrt(np.clip(1 - (x / param(rng, b, 0.92, 1.02)) ** 2, 0, 1))
    shoulder = -1.25 + 0.45 * smoothstep(0.2, 1.0, ax_) - y
    dens = 0.03 + param(rng, b, 0.5, 0.6) * wall * ramp(shoulder, 0.08)
    # lungs: parabolic apex, medial and (slightly convex) lateral borders, domed base
    m, w = sided(0.06, 0.09), sided(0.66, 0.76)
    u = (ax_ - m) / w
    apex = sided(-0.88, -0.8) + 1.1 * (u - 0.42) ** 2
    base = sided(0.46, 0.54, 0.05) + 0.06 * u - sided(0.1, 0.17) * np.clip(4 * u * (1 - u), 0, 1)
    bulge = 1 - 0.3 * smoothstep(0.1, -0.9, y) - 0.04 * smoothstep(0.1, 0.5, y)
    d = np.maximum(np.maximum(apex - y, y - base), (u - bulge) * w)
    np.maximum(d, -u * w, out=d)
    lung = ramp(d, 2.5 * px)
    depth = np.clip(d * -4.0, 0, 1)
    # heart (tilted ellipse, apex to the image right), mediastinum with the aortic knob
    hx, hy, th = param(rng, b, 0.08, 0.14), param(rng, b, 0.33, 0.4), param(rng, b, -0.55, -0.35)
    ha, hb = param(rng, b, 0.28, 0.35), param(rng, b, 0.22, 0.27)
    if findings is not None:                  # cardiomegaly: a heart 40-60% wider and taller
        grow = np.where(findings[:, 2, None, None], param(rng, b, 1.4, 1.6), F32(1))
        ha, hb = ha * grow, hb * grow
    c, sn = np.cos(th), np.sin(th)
    ha = ha * (0.72 + 0.28 * smoothstep(hy - 0.3, hy + 0.1, y))      # pear: narrow on top
    hu = (x - hx) * (c / ha) + (y - hy) * (sn / ha)
    hv = (y - hy) * (c / hb) - (x - hx) * (sn / hb)
    heart = ramp(hu * hu + hv * hv - 1, 0.12)
    knob = 0.06 * np.clip(1 - ((y + 0.3) / 0.09) ** 2, 0, 1) * left
    med = np.maximum(ramp(ax_ - 0.1 - knob, 3 * px), heart)
    lung *= 1 - med
    air = lung * (0.6 + 0.4 * depth)
    air *= param(rng, b, 0.36, 0.44) * (1 - 0.3 * smoothstep(-0.1, 0.5, y))
    dens -= air
    dens += 0.02 * med
    # trachea and main bronchi (air), vertebrae
    xt = x - param(rng, b, -0.02, 0.02)
    trachea = np.clip(1 - np.abs(xt) / 0.045, 0, 1) * smoothstep(-0.2, -0.32, y)
    bronchi = np.clip(1 - np.abs(y + 0.3 - 1.2 * np.abs(xt)) / 0.045, 0, 1) * (np.abs(xt) < 0.18) * (y > -0.3)
    dens -= 0.1 * np.maximum(trachea, bronchi)
    phase = 2 * np.pi * (y - param(rng, b, 0, 1)) / 0.13
    dens += 0.06 * np.clip(1 - ax_ / 0.075, 0, 1) * (0.5 + 0.5 * np.cos(phase)) * smoothstep(0.35, 0.0, y)
    # lung markings: streaky vessels, denser near the hila
    hil = 1 / (1 + ((ax_ - 0.2) ** 2 + y ** 2) / 0.05)
    ves = np.clip(1 - np.abs(smooth_noise(rng, b, size, 14, 22)) / 0.4, 0, 1)
    ves += 0.3 * smooth_noise(rng, b, size, 36)
    dens += lung * (hil * (0.08 + 0.06 * ves) + 0.025 * ves)
    # posterior ribs (arcs sloping down laterally), fainter anterior ribs, clavicles
    t = np.clip(ax_ - 0.06, 0, None)
    k = (y + 1.0 + 0.25 * t - 0.9 * t * t * t) / param(rng, b, 0.15, 0.17)
    frac = np.abs(k - np.floor(k) - 0.5)
    rib = np.clip(1 - np.abs(frac - 0.19) / 0.05, 0, 1) * 0.4 + np.clip((0.21 - frac) / 0.04, 0, 1) * 0.6
    k = (y + 0.95 + 0.35 * t) / 0.24
    rib += 0.25 * np.clip(1 - np.abs(k - np.floor(k) - 0.5) / 0.25, 0, 1)
    cage = ramp(np.maximum(d, -0.02 - u * w) - 0.06, 0.06) * (1 - 0.6 * med)
    dens += param(rng, b, 0.045, 0.065) * rib * cage
    clav = param(rng, b, -0.66, -0.6) - param(rng, b, 0.3, 0.4) * (ax_ - 0.1) + 0.2 * (ax_ - 0.1) ** 2
    dens += 0.09 * np.clip(1.4 - np.abs(y - clav) / 0.035, 0, 1) * smoothstep(0.07, 0.13, ax_) * (ax_ < 0.8)
    top = np.take_along_axis(base, np.abs(x - 0.38).argmin(axis=2)[..., None], axis=2)
    gx_, gy_ = (x - 0.38) / 0.09, (y - top - 0.08) / 0.05     # gastric air bubble
    dens -= 0.12 * (rng.random((b, 1, 1)) < 0.6) * ramp(gx_ * gx_ + gy_ * gy_ - 1, 0.5)

    opacity = np.zeros((b, size, size), bool)
    sel = np.flatnonzero(labels == 1)
    if len(sel):
        op = _opacity(rng, len(sel), size, x[sel], y[sel], m[sel], w[sel]) * lung[sel]
        dens[sel] += param(rng, len(sel), 0.25, 0.34) * op
        opacity[sel] = (op > 0.3) & (lung[sel] > 0.5)
    extra = {}
    if findings is not None:
        extra["effusion"] = np.zeros((b, size, size), bool)
        sel = np.flatnonzero(findings[:, 1])
        if len(sel):
            fluid = _effusion(rng, len(sel), size, y[sel], u[sel], base[sel], lung[sel], left[sel])
            dens[sel] += param(rng, len(sel), 0.28, 0.36) * fluid
            extra["effusion"][sel] = fluid > 0.5
        extra["cardiomegaly"] = (heart > 0.5) & findings[:, 2, None, None]
    img = dens * (1 - param(rng, b, 0.1, 0.2) * (x * x + y * y) / 2)   # vignetting
    img += white_noise(rng, img.shape, param(rng, b, 0.008, 0.02))
    img += 0.012 * smooth_noise(rng, b, size, 40)
    marker = np.zeros((b, size, size), bool)
    glyph_px = max(1, round(size / 64))
    for i in np.flatnonzero(markers):                            # bright lead letters in a corner
        bm = _glyphs(_TAGS[rng.integers(len(_TAGS))], glyph_px)
        h, w_ = bm.shape
        off = int(rng.integers(int(0.03 * size), int(0.07 * size) + 1))
        r0 = off if rng.random() < 0.75 else size - off - h
        c0 = off if rng.random() < 0.5 else size - off - w_
        marker[i, r0:r0 + h, c0:c0 + w_] = bm
        img[i][marker[i]] = rng.uniform(0.93, 1.0)
    np.clip(img, 0, 1, out=img)
    return img, {"opacity": opacity, "lungs": lung > 0.5, "marker": marker, **extra}


def _effusion(rng, n, size, y, u, base, lung, left):
    """Pleural fluid [n, H, W] in [0, 1] at the base of one or both lungs: it fills the lung from
    the dome up to a level that rises towards the chest wall (the meniscus) and blunts the
    costophrenic angle. ``u`` [n, 1, W] runs 0 (medial) to 1 (lateral) in each lung."""
    which = rng.choice(3, size=(n, 1, 1), p=[0.4, 0.4, 0.2])    # right, left, both lungs
    use = np.where(left, which != 0, which != 1)
    depth = param(rng, n, 0.2, 0.32)
    level = base - depth - 0.12 * np.clip(u, 0, 1) ** 2             # higher laterally
    return ramp(level - y, F32(3.0 / size)) * np.clip(lung, 0, 1) * use


def _opacity(rng, n, size, x, y, m, w):
    """Patchy consolidation [n, H, W] in [0, 1] in one or both lungs (x [n,1,W], y [n,H,1])."""
    which = rng.choice(3, size=(n, 1, 1), p=[0.4, 0.4, 0.2])    # right, left, both lungs
    fluff = np.clip(smooth_noise(rng, n, size, 30), -0.6, 2)
    out = np.zeros((n, size, size), F32)
    for side, use in ((-1, which != 1), (1, which != 0)):
        col = -1 if side > 0 else 0                                 # a column on that side
        u = param(rng, n, 0.5, 0.75) if side > 0 else param(rng, n, 0.3, 0.7)
        ox = side * (m[:, :, [col]] + u * w[:, :, [col]])
        oy = param(rng, n, -0.4, 0.12)
        blob = np.clip(1 - np.sqrt((x - ox) ** 2 + (y - oy) ** 2) / param(rng, n, 0.2, 0.34), 0, 1)
        patch = np.clip(blob * (1.5 + 1.1 * fluff) - 0.3, 0, 1)
        out = np.maximum(out, np.clip(0.45 * blob + 0.8 * patch, 0, 1) * use)
    return out
