"""Plausibility priors for counterfactual search: a small convolutional autoencoder and class prototypes.

The autoencoder works in *data space* (pixel values as loaded): it stores the per-channel mean and
std of its training images and normalises inside, so ``prior(x)`` and ``prior.decode(z)`` return
data-space values and ``reconstruction_error`` is a data-space mean squared error.

Architecture (2-D or 3-D, from the input): ``len(channels)`` stride-2 convolutions (3x3, ELU), then
a 3x3 convolution to ``latent_channels``; the decoder mirrors it with stride-2 transposed
convolutions. The latent code of ``[B, C, *S]`` is ``[B, latent_channels, *ceil(S / 2**len(channels))]``
(default ``channels=(16, 32)``: ``S / 4``). Sizes that are not a multiple of ``2**len(channels)`` are
padded (edge values repeated) before encoding and cropped after decoding.

Class prototypes follow Van Looveren & Klaise (2019), "Interpretable counterfactual explanations
guided by prototypes": a prototype is the mean latent code of the ``k`` training encodings of a class
nearest to a reference (the class mean in :func:`class_prototypes`, each explained instance in
:func:`instance_prototypes`, as in the paper's Algorithm 1).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import InputError, ModelLoadError

__all__ = ["AutoencoderPrior", "class_prototypes", "fit_class_autoencoders", "fit_prior", "instance_prototypes",
           "reconstruction_mse"]

FORMAT = "counterlens-prior/1"
CONFIG_FILE = "prior.json"
WEIGHTS_FILE = "weights.safetensors"


class AutoencoderPrior(nn.Module):
    """Convolutional autoencoder with data-space input and output (see the module docstring).

    ``in_channels``: C of the images; ``dims``: 2 (images ``[B, C, H, W]``) or 3 (volumes);
    ``channels``: widths of the stride-2 stages (each halves every spatial side);
    ``latent_channels``: channels of the code; ``input_size``: the spatial size it was fit on
    (used to crop :meth:`decode` output by default; None = no default crop).
    Built by :func:`fit_prior`; parameters are frozen (``requires_grad=False``) after fitting and
    loading, so gradients flow to the input only. Move it with ``prior.to(device)``.
    """

    def __init__(self, in_channels: int = 1, *, dims: int = 2, channels: Sequence[int] = (16, 32),
                 latent_channels: int = 4, input_size: Sequence[int] | None = None):
        super().__init__()
        channels = [int(c) for c in channels]
        if int(in_channels) < 1 or dims not in (2, 3) or not channels or min(channels) < 1 or int(latent_channels) < 1:
            raise InputError(f"AutoencoderPrior(in_channels={in_channels}, dims={dims}, channels={channels}, "
                             f"latent_channels={latent_channels}): use positive widths and dims 2 or 3")
        self.config = {"in_channels": int(in_channels), "dims": int(dims), "channels": channels,
                       "latent_channels": int(latent_channels),
                       "input_size": [int(s) for s in input_size] if input_size is not None else None}
        conv, convT = (nn.Conv2d, nn.ConvTranspose2d) if dims == 2 else (nn.Conv3d, nn.ConvTranspose3d)
        widths = [int(in_channels), *channels]
        enc: list[nn.Module] = []
        for a, b in pairwise(widths):
            enc += [conv(a, b, 3, stride=2, padding=1), nn.ELU()]
        enc.append(conv(widths[-1], int(latent_channels), 3, padding=1))
        dec: list[nn.Module] = [conv(int(latent_channels), widths[-1], 3, padding=1), nn.ELU()]
        for i, (a, b) in enumerate(zip(widths[:0:-1], widths[-2::-1])):
            dec.append(convT(a, b, 4, stride=2, padding=1))
            if i < len(channels) - 1:
                dec.append(nn.ELU())
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("mean", torch.zeros(int(in_channels)))
        self.register_buffer("std", torch.ones(int(in_channels)))
        self.info: dict = {}   # metadata saved with the prior (fit_prior puts the training record here)

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Every spatial side of the code is ``ceil(side / factor)``."""
        return 2 ** len(self.config["channels"])

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def latent_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Shape of one code (no batch dim) for inputs of spatial size ``spatial``."""
        return (self.config["latent_channels"], *(math.ceil(int(s) / self.factor) for s in spatial))

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *[1] * self.config["dims"])

    def _check(self, x, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, dtype=torch.float32)
        c, d = self.config["in_channels"], self.config["dims"]
        if x.dim() != d + 2 or x.shape[1] != c:
            raise InputError(f"{name} has shape {tuple(x.shape)}; this prior takes [B, {c}, "
                             f"{', '.join('HW' if d == 2 else 'DHW')}] ({c} channel(s), {d}-D)")
        return x

    # -- the autoencoder --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Data-space ``x [B, C, *S]`` -> code ``[B, latent_channels, *ceil(S / factor)]`` (differentiable)."""
        x = self._check(x)
        z = (x - self._view(self.mean)) / self._view(self.std)
        pad = [p for s in reversed(x.shape[2:]) for p in (0, -s % self.factor)]
        if any(pad):
            z = F.pad(z, pad, mode="replicate")
        return self.encoder(z)

    def decode(self, z: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Code ``[B, latent_channels, *L]`` -> data-space ``[B, C, *S]``.

        ``S`` = ``size`` when given, else the fitted ``input_size`` when the code has its latent
        shape, else ``L * factor`` (no crop).
        """
        lc, d = self.config["latent_channels"], self.config["dims"]
        if not isinstance(z, torch.Tensor) or z.dim() != d + 2 or z.shape[1] != lc:
            raise InputError(f"z has shape {tuple(getattr(z, 'shape', ()))}; expected a code [B, {lc}, *L] "
                             f"with {d} spatial dims (from prior.encode)")
        out = self.decoder(z) * self._view(self.std) + self._view(self.mean)
        if size is None and self.config["input_size"] is not None \
                and tuple(z.shape[1:]) == self.latent_shape(self.config["input_size"]):
            size = self.config["input_size"]
        if size is not None:
            size = [int(s) for s in size]
            if len(size) != d or any(s > o or s <= o - self.factor for s, o in zip(size, out.shape[2:])):
                raise InputError(f"size={size} does not fit a code of spatial shape {tuple(z.shape[2:])} "
                                 f"(decodes to {tuple(out.shape[2:])})")
            out = out[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` in data space, same shape as ``x``."""
        return self.decode(self.encode(x), size=x.shape[2:])

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row mean squared error ``mean((prior(x) - x)**2)`` in data space, ``[B]`` (differentiable)."""
        x = self._check(x)
        return (self(x) - x).pow(2).flatten(1).mean(1)

    # -- files ------------------------------------------------------------------------------------
    def save(self, out_dir, extra: dict | None = None) -> Path:
        """Write ``out_dir/prior.json`` (architecture + ``extra`` metadata) and ``out_dir/weights.safetensors``."""
        from safetensors.torch import save_file

        from ..cards import file_sha256
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in self.state_dict().items()}
        weights = out / WEIGHTS_FILE
        save_file(state, str(weights) + ".tmp", metadata={"format": "pt"})
        os.replace(str(weights) + ".tmp", weights)
        card = {"format": FORMAT, **self.config, "weights": WEIGHTS_FILE, "weights_sha256": file_sha256(weights),
                "torch": torch.__version__, **self.info, **dict(extra or {})}
        try:
            text = json.dumps(card, indent=2)
        except TypeError as exc:
            raise InputError(f"AutoencoderPrior.save: extra must hold JSON values: {exc}") from exc
        (out / (CONFIG_FILE + ".tmp")).write_text(text + "\n", encoding="utf-8")
        os.replace(out / (CONFIG_FILE + ".tmp"), out / CONFIG_FILE)
        return out

    @classmethod
    def load(cls, path, device="cpu") -> AutoencoderPrior:
        """Load a prior written by :meth:`save` (JSON + safetensors: no code runs). ``path``: the folder."""
        from safetensors.torch import load_file

        from ..cards import file_sha256
        folder = Path(path)
        folder = folder.parent if folder.name == CONFIG_FILE else folder
        card_path = folder / CONFIG_FILE
        if not card_path.is_file():
            raise ModelLoadError(f"{folder}: no {CONFIG_FILE} here; write a prior with `counterlens fit-prior` "
                                 "or AutoencoderPrior.save")
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{card_path}: not a readable prior file: {exc}") from exc
        if not isinstance(card, dict) or card.get("format") != FORMAT:
            raise ModelLoadError(f"{card_path}: format is {card.get('format') if isinstance(card, dict) else None!r}, "
                                 f"expected {FORMAT!r}")
        weights = folder / str(card.get("weights", WEIGHTS_FILE))
        if not weights.is_file():
            raise ModelLoadError(f"{weights}: weights file missing next to {card_path}")
        if card.get("weights_sha256") and file_sha256(weights) != card["weights_sha256"]:
            raise ModelLoadError(f"{weights}: SHA-256 differs from {card_path}; the files do not belong together")
        try:
            prior = cls(card["in_channels"], dims=card["dims"], channels=card["channels"],
                        latent_channels=card["latent_channels"], input_size=card.get("input_size"))
            prior.load_state_dict(load_file(str(weights)))
        except (KeyError, TypeError, RuntimeError, InputError) as exc:
            raise ModelLoadError(f"{card_path}: weights do not match the described architecture: {exc}") from exc
        prior.info = {k: v for k, v in card.items() if k not in prior.config and k not in
                      ("format", "weights", "weights_sha256", "torch")}
        return prior.requires_grad_(False).eval().to(device)


# -- fitting --------------------------------------------------------------------------------------
def _as_images(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() not in (4, 5) or x.shape[0] < 2 or min(x.shape) < 1:
        raise InputError(f"{name} has shape {tuple(x.shape)}; expected at least 2 images [N, C, H, W] "
                         "(or volumes [N, C, D, H, W])")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return x


def fit_prior(x_train, *, x_val=None, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
              channels: Sequence[int] = (16, 32), latent_channels: int = 4, device="cpu", progress: bool = True,
              log: Callable[[str], None] | None = None) -> AutoencoderPrior:
    """Fit an :class:`AutoencoderPrior` to data-space images ``x_train [N, C, *S]`` (MSE, Adam).

    The same ``seed`` gives the same weights on the CPU (same torch build and thread count); the
    caller's global RNG is left as it was. ``x_val`` (optional) is scored after each epoch.
    Returns the prior in eval mode with frozen parameters, on ``device``; ``prior.info`` holds the
    training record (saved with it): epochs, seed, per-epoch losses (data-space MSE), n_train.
    """
    from ..model import resolve_device
    x = _as_images(x_train, "x_train")
    xv = _as_images(x_val, "x_val") if x_val is not None else None
    if xv is not None and xv.shape[1:] != x.shape[1:]:
        raise InputError(f"x_val rows have shape {tuple(xv.shape[1:])} but x_train rows {tuple(x.shape[1:])}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"fit_prior: {name}={value!r}; pass a positive integer")
    dev = resolve_device(device)
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    forks = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        torch.manual_seed(seed)
        prior = AutoencoderPrior(x.shape[1], dims=x.dim() - 2, channels=channels, latent_channels=latent_channels,
                                 input_size=x.shape[2:])
        prior.mean.copy_(flat.mean(1))
        prior.std.copy_(flat.std(1).clamp_min(1e-6))
        prior.to(dev).train()
        opt = torch.optim.Adam(prior.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        order_rng = torch.Generator().manual_seed(int(seed))
        n = x.shape[0]
        scale = prior._view(prior.std)
        history: dict[str, list] = {"loss": [], "val_loss": []}
        bar = tqdm(total=epochs * math.ceil(n / batch_size), desc="fit prior", unit="batch", disable=not progress,
                   leave=False)
        try:
            for epoch in range(1, epochs + 1):
                total = torch.zeros((), device=dev)
                for idx in torch.randperm(n, generator=order_rng).split(batch_size):
                    xb = x[idx].to(dev)
                    diff = prior(xb) - xb
                    loss = (diff / scale).pow(2).mean()   # normalised-space MSE: every channel counts alike
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += diff.detach().pow(2).mean() * len(idx)   # data-space MSE for the record
                    bar.update(1)
                sched.step()
                history["loss"].append(total.item() / n)
                if xv is not None:
                    history["val_loss"].append(float(reconstruction_mse(prior, xv).mean()))
                bar.set_postfix(epoch=epoch, loss=f"{history['loss'][-1]:.4g}")
                if log is not None:
                    log(f"epoch {epoch}/{epochs}: train MSE {history['loss'][-1]:.4g}"
                        + (f", val MSE {history['val_loss'][-1]:.4g}" if xv is not None else ""))
        finally:
            bar.close()
            opt.zero_grad(set_to_none=True)   # leave no parameter gradients behind
    prior.info = {"training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": int(seed), "n_train": n,
                               "loss_per_epoch": [round(v, 6) for v in history["loss"]],
                               "val_loss_per_epoch": [round(v, 6) for v in history["val_loss"]] or None}}
    return prior.requires_grad_(False).eval()


@torch.no_grad()
def reconstruction_mse(prior: AutoencoderPrior, x, batch_size: int = 256) -> torch.Tensor:
    """Per-row data-space MSE of ``prior`` on ``x [N, C, *S]`` in chunks, no graph, on the CPU: ``[N]``."""
    x = torch.as_tensor(x).float()
    was = prior.training
    prior.eval()
    try:
        return torch.cat([prior.reconstruction_error(x[i:i + batch_size].to(prior.device)).cpu()
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        prior.train(was)


@torch.no_grad()
def _encode_all(prior: AutoencoderPrior, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([prior.encode(x[i:i + batch_size].to(prior.device)).cpu() for i in range(0, len(x), batch_size)])


def _labels(x, y, n_classes, name="y") -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_images(x, "x")
    y = torch.as_tensor(y).long()
    if y.shape != (x.shape[0],):
        raise InputError(f"{name} has shape {tuple(y.shape)}; expected [{x.shape[0]}] (one label per image)")
    if not isinstance(n_classes, int) or n_classes < 1 or int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise InputError(f"{name} holds labels {int(y.min())}..{int(y.max())} but n_classes={n_classes!r}")
    missing = [c for c in range(n_classes) if not (y == c).any()]
    if missing:
        raise InputError(f"{name} has no images of class(es) {missing}; every class needs training images")
    return x, y


def _check_k(k):
    if k is not None and (not isinstance(k, int) or k < 1):
        raise InputError(f"k={k!r}: pass a positive int, or None to use every image of a class")


def class_prototypes(prior: AutoencoderPrior, x, y, n_classes: int, k: int | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """One prototype per class in the latent space of ``prior``: ``[n_classes, *latent]`` (CPU).

    The prototype of class ``c`` is the mean code of the ``k`` encodings of ``x[y == c]`` closest
    (L2) to that class's mean code; ``k=None`` (default) uses all of them (the class mean).
    """
    x, y = _labels(x, y, n_classes)
    _check_k(k)
    codes = _encode_all(prior, x, batch_size)
    protos = []
    for c in range(n_classes):
        zc = codes[y == c].flatten(1)
        centre = zc.mean(0)
        if k is not None and k < len(zc):
            near = (zc - centre).pow(2).sum(1).topk(k, largest=False).indices
            centre = zc[near].mean(0)
        protos.append(centre)
    return torch.stack(protos).view(n_classes, *codes.shape[1:])


def instance_prototypes(prior: AutoencoderPrior, x0, x, y, n_classes: int, k: int | None = None,
                        batch_size: int = 256) -> torch.Tensor:
    """Per-instance prototypes (the paper's Algorithm 1): ``[B, n_classes, *latent]`` (CPU).

    For each row of ``x0 [B, C, *S]`` and class ``c``: the mean of the ``k`` codes of ``x[y == c]``
    nearest (L2) to ``prior.encode(x0[b])``; ``k=None`` uses all of them (the class mean, the same
    for every row).
    """
    x, y = _labels(x, y, n_classes)
    _check_k(k)
    codes = _encode_all(prior, x, batch_size)
    z0 = _encode_all(prior, prior._check(torch.as_tensor(x0).float(), "x0"), batch_size).flatten(1)
    flat = codes.flatten(1)
    out = torch.empty(z0.shape[0], n_classes, flat.shape[1])
    for c in range(n_classes):
        zc = flat[y == c]
        if k is None or k >= len(zc):
            out[:, c] = zc.mean(0)
            continue
        for i in range(0, len(z0), batch_size):   # chunks of rows, all rows of a chunk at once
            near = torch.cdist(z0[i:i + batch_size], zc, compute_mode="donot_use_mm_for_euclid_dist") \
                .topk(k, dim=1, largest=False).indices
            out[i:i + batch_size, c] = zc[near].mean(1)
    return out.view(z0.shape[0], n_classes, *codes.shape[1:])


def fit_class_autoencoders(x, y, n_classes: int, *, seed: int = 0, progress: bool = False,
                           **fit_kwargs) -> dict[int, AutoencoderPrior]:
    """One :class:`AutoencoderPrior` per class, fit on ``x[y == c]`` with seed ``seed + c`` (for IM1).

    ``fit_kwargs`` go to :func:`fit_prior` (epochs, batch_size, channels, latent_channels, device, ...).
    Each class sees fewer batches per epoch than a full fit; raise ``epochs`` accordingly.
    """
    x, y = _labels(x, y, n_classes)
    return {c: fit_prior(x[y == c], seed=seed + c, progress=progress, **fit_kwargs) for c in range(n_classes)}
