"""``counterlens fit-prior``: fit the autoencoder prior of plausible counterfactuals on an image folder."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_fit_prior_parser", "fit_prior_command"]


def add_fit_prior_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``fit-prior`` subcommand to ``subparsers`` (from ``parser.add_subparsers``) and return it."""
    from ..cli import positive_int
    p = subparsers.add_parser(
        "fit-prior", help="fit the autoencoder prior that keeps counterfactuals plausible",
        description="Fit a small convolutional autoencoder on DATA/Training (or DATA itself) and save it to PRIOR "
                    "(prior.json + weights.safetensors). `counterlens counterfactual --prior PRIOR` uses it for the "
                    "reconstruction-error term, class prototypes and the latent search. Prints the reconstruction "
                    "MSE on DATA/Testing when present, next to the mean-image baseline.")
    p.add_argument("--data", required=True, type=Path, help="image folder (class subfolders or flat)")
    p.add_argument("--out", required=True, type=Path, metavar="PRIOR", help="folder to write the prior to")
    p.add_argument("--size", type=positive_int, default=64,
                   help="image side the images are resized to; use the model's input size (default: 64)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (default: 1, grey)")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs (default: 30)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default: 64)")
    p.add_argument("--latent-channels", type=positive_int, default=4,
                   help="channels of the latent code, which is SIZE/4 per side (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def fit_prior_command(args) -> int:
    """Load the images, fit the prior, save it and print its test reconstruction error."""
    from ..commands import load_arrays, split_folders
    from ..data.images import ImageFolder
    from .prior import fit_prior, reconstruction_mse

    quiet = getattr(args, "quiet", False)
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    channels = getattr(args, "channels", 1)
    train_dir, test_dir = split_folders(Path(args.data))
    t0 = time.perf_counter()
    train_set = ImageFolder(train_dir, channels=channels, size=args.size)
    x = load_arrays(train_set, not quiet, labels=False)
    say(f"fitting the prior on {len(x)} images of {args.size}x{args.size} from {train_dir}, {args.epochs} epochs")
    prior = fit_prior(x, epochs=args.epochs, batch_size=getattr(args, "batch_size", 64), seed=args.seed,
                      latent_channels=args.latent_channels, device=getattr(args, "device", "auto"),
                      progress=not quiet, log=say)
    extra = {"trained_on": str(Path(args.data).resolve()), "value_range": [float(x.min()), float(x.max())]}
    line = f"train MSE {prior.info['training']['loss_per_epoch'][-1]:.3g}"
    if test_dir is not None:
        x_test = load_arrays(ImageFolder(test_dir, channels=channels, size=args.size), not quiet,
                             labels=False)
        mse = float(reconstruction_mse(prior, x_test).mean())
        baseline = float((x_test - x.mean(0, keepdim=True)).pow(2).mean())
        extra.update(test_mse=round(mse, 6), test_mse_mean_image=round(baseline, 6), n_test=len(x_test))
        line = (f"test reconstruction MSE {mse:.3g} on {len(x_test)} images of {test_dir} "
                f"(mean-image baseline {baseline:.3g}, {baseline / max(mse, 1e-12):.1f}x worse)")
    prior.cpu().save(args.out, extra=extra)
    print(f"{line}; prior written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
