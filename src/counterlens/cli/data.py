"""``counterlens data synth``: write a seeded synthetic dataset as PNG folders."""
from __future__ import annotations

import time

from ..data.synthetic import make_dataset, write_dataset
from ..errors import InputError


def data_synth(args) -> int:
    if args.shortcut_rate is not None and args.kind != "chest-xray":
        raise InputError("--shortcut-rate plants a marker in chest-xray images only; drop it for brain-mri")
    t0 = time.perf_counter()
    sets = make_dataset(args.kind, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                        shortcut_rate=args.shortcut_rate)
    out = write_dataset(sets, args.out)
    print(f"wrote {args.n_train} training and {args.n_test} test {args.kind} images to {out} "
          f"in {time.perf_counter() - t0:.1f} s (classes: {', '.join(sets['train'].classes)}; "
          f"masks in {out / 'masks'})")
    return 0
