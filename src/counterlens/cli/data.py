"""``counterlens data synth``: write a seeded synthetic dataset as PNG folders."""
from __future__ import annotations

import time

from ..data.synthetic import make_dataset, write_dataset
from ..errors import InputError


def data_synth(args) -> int:
    if args.kind == "brain-mri-3d":
        return _volumes(args)
    from .parser import DEFAULT_SIZE
    args.size = DEFAULT_SIZE if args.size is None else args.size
    if getattr(args, "slices", None) is not None:
        raise InputError(f"--slices sets the depth of brain-mri-3d volumes; drop it for {args.kind}")
    if args.shortcut_rate is not None and args.kind != "chest-xray":
        raise InputError("--shortcut-rate plants a marker in chest-xray images only; drop it for brain-mri")
    t0 = time.perf_counter()
    sets = make_dataset(args.kind, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                        shortcut_rate=args.shortcut_rate)
    out = write_dataset(sets, args.out)
    what = "findings" if args.kind == "chest-multilabel" else "classes"
    print(f"wrote {args.n_train} training and {args.n_test} test {args.kind} images to {out} "
          f"in {time.perf_counter() - t0:.1f} s ({what}: {', '.join(sets['train'].classes)}; "
          f"masks in {out / 'masks'}" + ("; labels in Training/labels.csv and Testing/labels.csv)"
                                          if what == "findings" else ")"))
    return 0


def _volumes(args) -> int:
    """``counterlens data synth brain-mri-3d``: NIfTI volumes (see :mod:`counterlens.data.volumes`)."""
    from ..data.volumes import make_volume_dataset, write_volume_dataset
    if args.shortcut_rate is not None:
        raise InputError("--shortcut-rate plants a marker in chest-xray images only; drop it for brain-mri-3d")
    side = 32 if args.size is None else args.size
    shape = (args.slices if args.slices is not None else side, side, side)
    t0 = time.perf_counter()
    sets = make_volume_dataset(n_train=args.n_train, n_test=args.n_test, size=shape, seed=args.seed)
    out = write_volume_dataset(sets, args.out)
    spacing = " x ".join(f"{v:.3g}" for v in sets["train"].spacing)
    print(f"wrote {args.n_train} training and {args.n_test} test brain-mri-3d volumes of {shape[0]}x{shape[1]}x"
          f"{shape[2]} voxels ({spacing} mm) to {out} in {time.perf_counter() - t0:.1f} s as NIfTI "
          f"(classes: {', '.join(sets['train'].classes)}; masks in {out / 'masks'})")
    return 0
