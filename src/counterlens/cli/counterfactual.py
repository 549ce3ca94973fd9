"""``counterlens counterfactual``: counterfactuals of every image of a folder (or, with ``--table``, of
every row of a table: :mod:`.tabular`) into a run directory."""
from __future__ import annotations

from ..errors import CounterlensError, InputError
from .common import has_class_folders, image_dataset, load_classifier, print_summary, target_arg
from .engine import engine_of, model_args
from .tabular import tabular_counterfactual_cmd


def counterfactual(args) -> int:
    """``--table``: the tabular search; else the image search of ``--data``."""
    if getattr(args, "table", None) is not None:
        if getattr(args, "engine", "local") != "local":
            raise InputError("--engine ray runs image folders (--data); counterfactuals of a table (--table) run on "
                             "this machine: leave --engine out")
        return tabular_counterfactual_cmd(args)
    if args.data is None:
        raise CounterlensError("counterfactual: pass --data (images) or --table (a CSV table)")
    return counterfactual_cmd(args)


def counterfactual_cmd(args) -> int:
    from ..data.folders import load_arrays
    from ..data.images import ImageFolder
    from ..runs.dataset import counterfactual_folder
    from ..viz.report import write_report
    engine = engine_of(args, model_args(args))
    clf = load_classifier(args)
    dataset, diagnosis = image_dataset(clf, args.data, masks=args.editable_masks, limit=args.limit,
                                       window=getattr(args, "window", "auto"))
    params = {"threshold": args.threshold, "steps": args.steps, "candidates": args.candidates,
              "l1": args.l1, "l2": args.l2, "tv": args.tv, "schedule": args.schedule, "early_stop": args.early_stop,
              "batch_size": args.batch_size, "seed": args.seed}
    if (args.prototypes or args.latent) and args.prior is None:
        raise InputError(f"{'--prototypes' if args.prototypes else '--latent'} needs --prior PRIOR "
                         "(an autoencoder from `counterlens fit-prior`)")
    if args.prototypes and args.train_data is None:
        raise InputError("--prototypes needs --train-data DIR: the labelled training images the prototypes are "
                         "the class means of")
    train = None
    if args.train_data is not None:
        if not has_class_folders(args.train_data):
            raise InputError(f"--train-data {args.train_data}: expected a folder with one subfolder per class")
        train_set = ImageFolder(args.train_data, channels=dataset.channels, size=dataset.size, classes=clf.classes)
        train = load_arrays(train_set, progress=not args.quiet)
    if args.prior is not None:
        from ..counterfactual.prior import AutoencoderPrior, class_prototypes
        prior = AutoencoderPrior.load(args.prior, device=clf.device)
        check_prior_size(prior, clf.input_size or getattr(dataset, "size", None), args.prior)
        prior_weight = 0.0 if args.prototypes else args.prior_weight
        params.update(prior=prior, prior_weight=prior_weight if not args.latent else 0.0, latent=args.latent)
        if args.prototypes:
            n_classes = len(clf.classes) if clf.classes else int(train[1].max()) + 1
            params.update(prototypes=class_prototypes(prior, train[0], train[1], n_classes),
                          proto_weight=args.proto_weight)
    target = target_arg(args.target)
    settings = {"editable_masks": str(args.editable_masks or ""), "prior": str(args.prior or ""),
                "train_data": str(args.train_data or ""), "prototypes": bool(args.prototypes),
                "proto_weight": args.proto_weight if args.prototypes else None}
    summary = counterfactual_folder(clf, dataset, args.out, target=target, params=params, settings=settings,
                                    train=train, images_per_batch=args.images_per_batch, workers=args.workers,
                                    threads=args.threads, progress=not args.quiet, model_source=str(args.model),
                                    data_source=str(args.data), overwrite=args.overwrite, force=args.force,
                                    engine=engine, loading=diagnosis.loading, select=getattr(args, "select", None))
    print_summary("counterfactuals for", summary, args.out)
    if not args.no_report:
        print(f"report: {write_report(args.out)}")
    return 0


def check_prior_size(prior, model_size, path) -> None:
    """Refuse a prior fit on images of another size than the model's input (before any search)."""
    fitted = prior.config.get("input_size")
    if not fitted or not model_size or [int(s) for s in fitted] == [int(s) for s in model_size]:
        return
    fitted_text, model_text = "x".join(map(str, map(int, fitted))), "x".join(map(str, map(int, model_size)))
    fix = (f"counterlens fit-prior --data DIR --size {int(model_size[0])} --out PRIOR" if len(set(model_size)) == 1
           else f"counterlens fit-prior on images of {model_text}")
    raise InputError(f"--prior {path} was fit on {fitted_text} images but the model takes {model_text}; fit a prior "
                     f"at the model's size: {fix}")
