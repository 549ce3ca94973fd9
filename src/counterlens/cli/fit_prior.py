"""``counterlens fit-prior``: fit the autoencoder prior of plausible counterfactuals on an image folder
(its options: :func:`counterlens.cli.parser.add_fit_prior_parser`)."""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["fit_prior_command"]


def fit_prior_command(args) -> int:
    """Load the images, fit the prior, save it and print its test reconstruction error."""
    from ..counterfactual.prior import fit_prior, reconstruction_mse
    from ..data.folders import load_arrays, split_folders
    from ..data.images import ImageFolder

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
        line = f"test reconstruction MSE {mse:.3g} on {len(x_test)} images of {test_dir} ({versus_mean_image(mse, baseline)})"
    prior.cpu().save(args.out, extra=extra)
    print(f"{line}; prior written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def versus_mean_image(mse: float, baseline: float) -> str:
    """How the prior's test MSE compares with predicting the mean training image, in words that say which is better."""
    if mse < baseline:
        return f"mean-image baseline {baseline:.3g}: the prior's error is {baseline / max(mse, 1e-12):.1f}x smaller"
    return (f"mean-image baseline {baseline:.3g}: the prior's error is {mse / max(baseline, 1e-12):.1f}x larger, "
            "no better than the mean image; train more --epochs or on more images")
