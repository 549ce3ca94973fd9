"""``counterlens train``: train a reference CNN on an image folder and save a model directory."""
from __future__ import annotations

from ..train_folder import train_model


def train(args) -> int:
    train_model(args.data, args.arch, args.out, size=args.size, width=args.width, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, progress=not args.quiet,
                volume=True if getattr(args, "volume", False) else None)
    return 0
