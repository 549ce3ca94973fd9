"""The argument parser of the ``counterlens`` command: every subcommand, option, default and help text.

Building it imports no library code, so ``--help`` and argument errors come before any model is loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import (auto_or_positive_int, batch_size_arg, comma_list, display_arg, learning_rate_arg, positive_int,
                     preprocess_arg, share, window_arg)
from .engine import add_engine_args
from .run_spec import add_run_parser

DEFAULT_METHODS = "gradcam,integrated_gradients"
DEFAULT_SIZE = 64          # data synth, train, fit-prior and demo: one image side unless --size says otherwise


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a model directory written by `counterlens train` (model.json + weights), a TorchScript "
                        "file, a torch.export .pt2 file, a Keras .keras / .h5 file (counterlens[keras]), or a "
                        "state_dict file together with --factory")
    p.add_argument("--factory", metavar="PKG.MODULE:FUNCTION",
                   help="function that builds the network for a state_dict file (its weights load with weights_only=True)")
    p.add_argument("--trust-model-file", action="store_true",
                   help="allow loading a fully pickled model (or a Keras Lambda layer's code); this runs code from "
                        "the file, so only for files you trust")
    p.add_argument("--classes", type=comma_list, help="class names in output order, comma-separated (default: from the model card)")
    p.add_argument("--device", default="auto", help="'auto' (a GPU when present), 'cpu' or 'cuda[:N]' (default: auto)")
    p.add_argument("--logits-output", metavar="INDEX|KEY",
                   help="for a model that returns several outputs (a tuple, list or dict): which one holds the logits")
    p.add_argument("--output-head", choices=("auto", "logits", "probabilities", "sigmoid", "multilabel"), default=None,
                   help="what the model outputs: logits, softmax probabilities (explained on the pre-softmax logits), "
                        "one sigmoid (a binary classifier) or one sigmoid per finding (multilabel) "
                        "(default: the model card's, else auto: detected from a final Softmax/Sigmoid)")
    p.add_argument("--precision", choices=("bf16", "fp16"), default=None,
                   help="run the model under autocast in bfloat16 or float16 (maps, baselines and thresholds stay "
                        "float32; on the CPU bf16 is the one that can be faster) (default: the model's own dtype)")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """What the model takes, for a model file without a card (TorchScript, .pt2) or to correct a card."""
    p.add_argument("--size", nargs="+", type=positive_int, metavar="N",
                   help="the model's input size, H W (or D H W for volumes): every image is resized to it (default: "
                        "the model card's input_size, else each image's own size when the model takes it)")
    p.add_argument("--channels", type=positive_int, metavar="N",
                   help="the model's input channels: 3 repeats grey images, 1 turns RGB into grey (default: the card's "
                        "in_channels, else the model's first layer when the data already has that many)")
    p.add_argument("--value-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="the data values the model takes, in data space (default: the card's value_range); "
                        "counterfactuals stay inside it and data outside it is warned about")
    p.add_argument("--preprocess", type=preprocess_arg, metavar="SPEC",
                   help="what the model does to the data before its first layer, replacing the card's: "
                        "normalize:MEAN,STD (per channel normalize:M1/M2/M3,S1/S2/S3), imagenet, none, or a model "
                        "card's JSON list (e.g. normalize:-1000,4000 maps CT values -1000..3000 onto 0..1)")


def _add_window_arg(p: argparse.ArgumentParser) -> None:
    """How the loader turns stored values (Hounsfield units, raw MR intensities) into data values."""
    p.add_argument("--window", type=window_arg, default="auto", metavar="auto|none|C,W",
                   help="auto: a DICOM file's own window (VOI LUT or WindowCenter/Width) onto 0..1 where it has one; "
                        "none: values as stored (e.g. HU); CENTER,WIDTH: center -/+ width/2 onto 0..1 for every file "
                        "of any format, e.g. 40,400 (soft tissue) or -600,1500 (lung) (default: auto)")


def _add_run_args(p: argparse.ArgumentParser, what: str) -> None:
    """How a dataset run is spread over this machine and what happens to an existing run directory."""
    p.add_argument("--select", metavar="misclassified|correct|CLASS",
                   help="only the images the model gets wrong, those it gets right, or those of one class (class "
                        "subfolders needed; after --limit); part of the run: another selection needs another --out")
    p.add_argument("--images-per-batch", type=positive_int, default=16,
                   help=f"images {what} together and written as one batch (default: 16)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes that work on batches at once (default: one per CPU core on the CPU, 1 on a GPU); "
                        "with --engine ray: actors (default: as many as the cluster holds)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per worker (default: the cores divided among the workers; with --engine ray: "
                        "--cpus-per-worker)")
    add_engine_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results already in --out and start over (needed when settings differ; "
                        "without it a re-run resumes)")
    p.add_argument("--force", action="store_true",
                   help="write the run into a folder that holds other files (they are left untouched)")


def _add_display_args(p: argparse.ArgumentParser) -> None:
    """How the report and its figures show a map over its image (counterlens.viz.plots.OverlayStyle).
    Each is kept in RUN/run.yaml by the report, so a later command that re-writes it keeps it."""
    last = "default: as this run's report was last drawn, else "
    p.add_argument("--clip-percentile", type=float, default=None, metavar="P",
                   help=f"clip the colour scale of maps at 100 minus this percentile of |map|, in [0, 50) ({last}0.5)")
    p.add_argument("--colormap", type=display_arg("check_cmap", False), default=None, metavar="NAME",
                   help="a matplotlib colour map for the maps, e.g. jet, viridis, inferno; 'auto': RdBu_r centred "
                        f"on zero for signed maps, inferno for non-negative ones ({last}auto)")
    p.add_argument("--alpha", type=display_arg("check_alpha", True), default=None, metavar="A",
                   help="opacity in (0, 1] of a map where |map| reaches the clip, fading with |map|; the report's "
                        f"opacity sliders start there ({last}0.75)")
    p.add_argument("--absolute", action=argparse.BooleanOptionalAction, default=None,
                   help=f"show |map| (colour scale from 0 to the clip) instead of the signed map ({last}signed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="counterlens",
        description="Explain what a PyTorch classifier bases its decisions on: attribution maps, counterfactuals, "
                    "trust metrics (faithfulness, sanity, localisation, shortcut audit), "
                    "run directories and an HTML report.")
    parser.add_argument("--version", action="version", version=f"counterlens {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="generate datasets", description="Generate datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    synth = data_sub.add_parser(
        "synth", help="write a synthetic brain-mri or chest-xray dataset with ground-truth masks",
        description="Write a seeded synthetic dataset as PNG folders in class-subfolder layout "
                    "(OUT/Training/<class>/, OUT/Testing/<class>/) with masks in OUT/masks/<name>/.")
    synth.add_argument("kind", choices=["brain-mri", "chest-xray", "chest-multilabel", "brain-mri-3d"],
                       help="brain-mri-3d: brain MRI volumes with 3-D tumour masks, as NIfTI (.nii.gz) files; "
                            "chest-multilabel: chest films with any of opacity, effusion, cardiomegaly, written "
                            "flat (OUT/Training/*.png) with OUT/Training/labels.csv (path,opacity,effusion,"
                            "cardiomegaly; 1/0 per finding) and one mask folder per finding (OUT/masks/<finding>/)")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--n-train", type=int, default=1600, help="training images (default: 1600)")
    synth.add_argument("--n-test", type=int, default=400, help="test images (default: 400)")
    synth.add_argument("--size", type=int, default=None,
                       help=f"image side in pixels (default: {DEFAULT_SIZE}; brain-mri-3d: 32, the volume's side)")
    synth.add_argument("--slices", type=int, default=None,
                       help="brain-mri-3d: axial slices per volume, for anisotropic voxels (default: --size)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--shortcut-rate", type=float, default=None,
                       help="chest-xray only: plant a marker that agrees with the label at this rate in training "
                            "(e.g. 0.9); the test split stays clean")

    train = sub.add_parser("train", help="train a reference model on an image folder",
                           description="Train a reference CNN on DATA/Training (or DATA itself), test on DATA/Testing "
                                       "when present, and save a model directory (weights + model.json card). "
                                       "Documented sizes, at which the defaults train each reference model on its "
                                       "`counterlens data synth` set to a useful accuracy (BENCHMARKS.md): --size 32, "
                                       "64, 128 and 224 for pneumonia-cnn and brain-tumor-cnn; 32, 64 and 128 for "
                                       "small-resnet and chest-findings-cnn; 32 for brain-tumor-cnn3d. A test "
                                       "accuracy at chance (or one finding's AUC at chance) ends with a warning.")
    train.add_argument("--data", required=True, type=Path, help="dataset folder in class-subfolder layout")
    train.add_argument("--arch", required=True,
                       help="pneumonia-cnn, brain-tumor-cnn, small-resnet, brain-tumor-cnn3d (volumes) or "
                            "chest-findings-cnn (multi-label: on a folder with labels.csv it is trained with a "
                            "sigmoid per finding, and its card says output: multilabel)")
    train.add_argument("--volume", action="store_true",
                       help="train on whole volumes (NIfTI, DICOM series folders) resized to SIZE^3 with the 3-D "
                            "version of --arch (implied by brain-tumor-cnn3d)")
    train.add_argument("--out", required=True, type=Path, help="model directory to write")
    train.add_argument("--size", type=int, default=DEFAULT_SIZE,
                       help=f"input side the model is built for (default: {DEFAULT_SIZE})")
    train.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (default: 1.0)")
    train.add_argument("--epochs", type=auto_or_positive_int, default="auto",
                       help="training epochs, or auto (default): 8, and 16 for chest-findings-cnn (its three "
                            "findings need them beyond 32 px)")
    train.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    train.add_argument("--lr", type=learning_rate_arg, default="auto",
                       help="Adam learning rate of every layer, or auto (default): 1e-3, and 1e-3 * 8192 / F for a "
                            "dense layer with F > 8192 inputs (the flatten of pneumonia-cnn from 128 px and of "
                            "brain-tumor-cnn from 64 px), which at 1e-3 can end at chance; the card records the rates")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    explain = sub.add_parser("explain", help="explain every image of a folder into a run directory",
                             description="Compute attribution maps for each image and write the run directory "
                                         "(RUN/run.yaml, RUN/index/, RUN/arrays/) and RUN/report.html. Re-running "
                                         "the same command resumes where it stopped; other settings are refused "
                                         "unless --overwrite. Read it back with counterlens.open_run(RUN).")
    _add_model_args(explain)
    _add_input_args(explain)
    _add_window_arg(explain)
    explain.add_argument("--data", required=True, type=Path,
                         help="an image file, a flat folder, or a folder in class-subfolder layout")
    explain.add_argument("--out", required=True, type=Path, help="run directory")
    explain.add_argument("--methods", type=comma_list, default=comma_list(DEFAULT_METHODS),
                         help=f"comma-separated methods, or 'all' (default: {DEFAULT_METHODS}); see `counterlens methods`")
    explain.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE",
                         help="method parameter, repeatable, e.g. --param integrated_gradients.steps=64")
    explain.add_argument("--target", default="predicted",
                         help="'predicted' (default) or a class name or index; multi-label models (one sigmoid per "
                              "finding): a finding (one map per image), or 'all-positive' (one map per image and "
                              "finding with probability >= 0.5; images with none are recorded as such)")
    explain.add_argument("--masks", type=Path,
                         help="folder of masks matched to images by file stem; for a multi-label folder (labels.csv) a "
                              "folder with one subfolder per finding (masks/opacity/...) gives a mask per finding")
    explain.add_argument("--limit", type=positive_int, help="explain at most this many images (spread over classes)")
    explain.add_argument("--batch-size", type=batch_size_arg, default=64,
                         help="rows per model call (default: 64); 'auto' measures the fastest chunk size")
    _add_run_args(explain, "explained")
    explain.add_argument("--map-dtype", choices=["float32", "float16"], default="float32",
                         help="how maps are stored (default: float32; float16 halves the disk and refuses maps whose "
                              "values it cannot hold)")
    explain.add_argument("--seed", type=int, default=0, help="seed of random methods (default: 0)")
    _add_display_args(explain)
    explain.add_argument("--no-report", action="store_true", help="do not write report.html")
    explain.add_argument("--quiet", action="store_true", help="no progress bar")

    cf = sub.add_parser("counterfactual", help="smallest edits that change the model's decision, into a run directory",
                        description="Search a counterfactual for every image (batched gradient search in data space, "
                                    "each image's distance weight adapted step by step) into the run directory "
                                    "and RUN/report.html. Re-running into the same RUN resumes.")
    _add_model_args(cf)
    _add_input_args(cf)
    _add_window_arg(cf)
    cf.add_argument("--data", type=Path, help="an image file or folder (class subfolders give labels); or use --table")
    cf.add_argument("--table", type=Path, help="a CSV table: counterfactuals of its rows (tabular search) instead of --data")
    cf.add_argument("--label", help="--table: the label column (not a feature)")
    cf.add_argument("--schema", type=Path,
                    help="--table: the schema the model was trained with (TabularSchema.save); default: "
                         "<model>.schema.json next to the model when present, else read from the table")
    cf.add_argument("--immutable", type=comma_list, help="--table: features that may not change, comma-separated (e.g. sex,age)")
    cf.add_argument("--monotone", type=comma_list, help="--table: FEATURE:increase or FEATURE:decrease, comma-separated")
    cf.add_argument("--k", type=positive_int, default=4, help="--table: counterfactuals per row (default: 4)")
    cf.add_argument("--diversity", type=float, default=0.8,
                    help="--table: how much extra cost an alternative may take for being far from the ones already "
                         "chosen (0: the k cheapest; below 1) (default: 0.8)")
    cf.add_argument("--plausibility", type=share, default=0.0,
                    help="--table: also require this share of each counterfactual's 5 nearest rows of the table to be "
                         "put in its class by the model (e.g. 0.8: data-supported, larger edits) (default: 0, off)")
    cf.add_argument("--out", required=True, type=Path, help="run directory (may hold an explain run of the same model)")
    cf.add_argument("--target", default="other",
                    help="class name or index to reach, or 'other' for any class but the predicted one (default); "
                         "multi-label models: FINDING:off or FINDING:on switches one finding (the others' "
                         "probabilities are reported)")
    cf.add_argument("--threshold", type=float, default=0.5, help="probability the target must reach (default: 0.5)")
    cf.add_argument("--steps", type=int, default=500,
                    help="optimisation steps per image at most (bisection: per lambda round) (default: 500)")
    cf.add_argument("--schedule", choices=["adaptive", "bisection"], default="adaptive",
                    help="adaptive: one run, lambda follows validity step by step (fast, default); bisection: one "
                         "optimisation per lambda (slower, slightly smaller edits)")
    cf.add_argument("--early-stop", type=int, default=None,
                    help="stop an image after this many steps without 1%% progress (default: 6 adaptive, 50 bisection)")
    cf.add_argument("--candidates", type=int, default=1, help="candidates per image, different starts (default: 1)")
    cf.add_argument("--l1", type=float, default=1.0, help="weight of the L1 part of the distance (default: 1)")
    cf.add_argument("--l2", type=float, default=1.0, help="weight of the squared L2 part (default: 1)")
    cf.add_argument("--tv", type=float, default=0.0, help="total-variation weight (default: 0)")
    cf.add_argument("--editable-masks", type=Path,
                    help="folder of masks matched by file stem: only pixels inside a mask may change")
    cf.add_argument("--prior", type=Path, help="autoencoder written by `counterlens fit-prior`")
    cf.add_argument("--prior-weight", type=float, default=1.0, help="weight of its reconstruction error (default: 1)")
    cf.add_argument("--latent", action="store_true", help="search the prior's latent code instead of the pixels")
    cf.add_argument("--train-data", type=Path,
                    help="the labelled training folder (class subfolders): each counterfactual records its distance "
                         "to the nearest training image of its target class, and --prototypes uses it")
    cf.add_argument("--prototypes", action="store_true",
                    help="guide the search to the target class's prototype in the prior's code space (needs --prior "
                         "and --train-data)")
    cf.add_argument("--proto-weight", type=float, default=10.0, help="weight of the prototype term (default: 10)")
    cf.add_argument("--limit", type=positive_int, help="at most this many images (spread over classes)")
    cf.add_argument("--batch-size", type=batch_size_arg, default=None,
                    help="rows searched together (default: sized by the image; 8192 for tables)")
    _add_run_args(cf, "searched")
    cf.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    cf.add_argument("--no-report", action="store_true", help="do not write report.html")
    cf.add_argument("--quiet", action="store_true", help="no progress bar")

    add_fit_prior_parser(sub)
    add_run_parser(sub)

    audit = sub.add_parser("audit", help="does the model rely on a suspected region (e.g. a marker)? flip rates and a verdict",
                           description="Inpaint a suspected region (a masks folder or a box) and random regions of the "
                                       "same area, count the decisions that change, score attribution maps in the region, "
                                       "and write RUN/audit.json, RUN/audit.md and a run directory. Prints a "
                                       "plain-language verdict.")
    _add_model_args(audit)
    _add_input_args(audit)
    _add_window_arg(audit)
    audit.add_argument("--data", required=True, type=Path, help="an image file or folder (class subfolders give labels)")
    audit.add_argument("--region", required=True, metavar="MASKS_DIR|x0,y0,x1,y1",
                       help="folder of masks matched to images by file stem, or a box x0,y0,x1,y1 in pixels of the "
                            "model's input size (x1, y1 exclusive); volumes: x0,y0,z0,x1,y1,z1 (z: the slice)")
    audit.add_argument("--out", required=True, type=Path, help="run directory")
    audit.add_argument("--methods", type=comma_list, default=comma_list(DEFAULT_METHODS),
                       help=f"attribution methods scored in the region (default: {DEFAULT_METHODS}); '' for none")
    audit.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE",
                       help="method parameter, repeatable, e.g. --param integrated_gradients.steps=32")
    audit.add_argument("--limit", type=positive_int, help="at most this many images (spread over classes)")
    audit.add_argument("--batch-size", type=batch_size_arg, default=64, help="rows per model call (default: 64)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the random regions and methods (default: 0)")
    audit.add_argument("--n-random", type=positive_int, default=8, help="random regions per image (default: 8)")
    audit.add_argument("--inpaint", choices=["normalized", "biharmonic"], default="normalized",
                       help="how the region is filled from its surroundings (default: normalized)")
    audit.add_argument("--min-flip-rate", type=float, default=0.1,
                       help="share of decisions that must change for an alarm (default: 0.1); see docs/trust.md")
    audit.add_argument("--fail-on-shortcut", action="store_true",
                       help="exit with status 3 when the model relies on the region (for CI)")
    audit.add_argument("--overwrite", action="store_true",
                       help="replace the results already in --out (needed when they were made with other settings)")
    audit.add_argument("--force", action="store_true",
                       help="write the run into a folder that holds other files (they are left untouched)")
    audit.add_argument("--no-report", action="store_true", help="do not write report.html")
    audit.add_argument("--quiet", action="store_true",
                       help="print only the verdict (not where the files were written)")

    ev = sub.add_parser("evaluate", help="trust metrics of a run directory (faithfulness, localisation, sanity)",
                        description="Score the maps of a run: deletion/insertion AUC, MuFidelity, sparseness, entropy, "
                                    "IG completeness, localisation against masks (with --masks) and the model-"
                                    "randomisation sanity check. Writes the metrics table of RUN/results.sqlite, "
                                    "RUN/metrics.csv, RUN/metrics_summary.csv, RUN/curves.json and RUN/sanity.json.")
    ev.add_argument("run", type=Path, help="run directory written by `counterlens explain`")
    ev.add_argument("--masks", type=Path,
                    help="folder of ground-truth masks matched to the images by file stem (enables localisation)")
    ev.add_argument("--model", metavar="PATH", help="the run's model (default: the source recorded in RUN/run.yaml)")
    ev.add_argument("--factory", metavar="PKG.MODULE:FUNCTION", help="builds the module for a state-dict --model")
    ev.add_argument("--trust-model-file", action="store_true",
                    help="allow a fully pickled model (can run code when loaded)")
    ev.add_argument("--classes", type=comma_list, help="class names, comma-separated")
    _add_input_args(ev)
    ev.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda[:N]")
    ev.add_argument("--metrics", type=comma_list, help="comma-separated metric names (default: all that apply)")
    ev.add_argument("--steps", type=positive_int, default=20, help="deletion/insertion steps (default: 20)")
    ev.add_argument("--baseline", choices=["blur", "zero", "mean"], default="blur",
                    help="what deleted pixels become (default: blur)")
    ev.add_argument("--batch-size", type=batch_size_arg, default=64, help="rows per model call (default: 64)")
    ev.add_argument("--sanity-images", type=int, default=8, help="images for the randomisation test; 0 skips it")
    ev.add_argument("--sanity-methods", type=comma_list,
                    help="methods for the randomisation test, comma-separated (default: every method of the run)")
    ev.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ev.add_argument("--images-per-batch", type=positive_int, default=32,
                    help="images scored together (with --engine ray: one task of an actor) (default: 32)")
    add_engine_args(ev)
    ev.add_argument("--workers", type=positive_int, default=None,
                    help="--engine ray: actors (default: as many as the cluster holds)")
    ev.add_argument("--select", metavar="misclassified|correct|CLASS",
                    help="score only the images the model got wrong, right, or of one class; recorded in the run "
                         "(another selection later is refused)")
    ev.add_argument("--no-report", action="store_true", help="do not re-write RUN/report.html with the metrics")
    _add_display_args(ev)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("methods", help="list the attribution methods with their defaults",
                   description="List every attribution method, a one-line description and its parameters.")

    report = sub.add_parser("report", help="(re)write RUN/report.html from a run directory",
                            description="Render the HTML report of a run directory: one self-contained file, or for "
                                        "large runs RUN/report/index.html with a paged gallery (opens offline).")
    report.add_argument("run", type=Path, help="run directory")
    _add_display_args(report)
    report.add_argument("--figures", action="store_true",
                        help="also write RUN/figures/<id>_<name>.png, one figure per case (about 0.5-1 s per case)")
    report.add_argument("--page-size", type=positive_int, default=24, help="cases per page of the gallery (default: 24)")
    report.add_argument("--single-file-max", type=positive_int, default=2000,
                        help="up to this many cases the report is one self-contained file; beyond, RUN/report/index.html "
                             "with the dataset views and a paged gallery of separate files (default: 2000)")

    demo = sub.add_parser("demo", help="the whole path on synthetic data: data, training, explanations, counterfactuals, "
                                       "metrics, report",
                          description="Synthesise brain-MRI slices, train the brain-tumour CNN, explain 16 test images "
                                      "(correct and incorrect) with every attribution method, search counterfactuals for "
                                      "8 of them, score the maps and write a run directory with report.html. With "
                                      "--shortcut: the chest X-ray shortcut case and its audit.")
    demo.add_argument("--out", type=Path, default=Path("demo-run"), help="run directory (default: demo-run)")
    demo.add_argument("--work", type=Path, default=None,
                      help="where data and model go (default: next to the run, OUT-work)")
    demo.add_argument("--n-train", type=int, default=1600, help="training images (default: 1600)")
    demo.add_argument("--n-test", type=int, default=400, help="test images (default: 400)")
    demo.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side (default: {DEFAULT_SIZE})")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's own)")
    demo.add_argument("--cases", type=int, default=16, help="test images to explain (default: 16)")
    demo.add_argument("--methods", type=comma_list, default=["all"],
                      help="attribution methods, comma-separated, or 'all' (default: all)")
    demo.add_argument("--counterfactuals", type=int, default=8,
                      help="cases that also get a counterfactual (default: 8)")
    demo.add_argument("--shortcut", action="store_true",
                      help="the chest X-ray shortcut case instead: a model trained where a marker agrees with the "
                           "label, explained and audited (does it rely on the marker?)")
    demo.add_argument("--multilabel", action="store_true",
                      help="the multi-label case instead: chest films with any of opacity, effusion and an enlarged "
                           "heart, a CNN with a sigmoid per finding, one map per image and positive finding, "
                           "findings switched off by counterfactuals, metrics per finding (under 2 minutes)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


def add_fit_prior_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``fit-prior`` subcommand to ``subparsers`` (from ``parser.add_subparsers``) and return it."""
    p = subparsers.add_parser(
        "fit-prior", help="fit the autoencoder prior that keeps counterfactuals plausible",
        description="Fit a small convolutional autoencoder on DATA/Training (or DATA itself) and save it to PRIOR "
                    "(prior.json + weights.safetensors). `counterlens counterfactual --prior PRIOR` uses it for the "
                    "reconstruction-error term, class prototypes and the latent search. Prints the reconstruction "
                    "MSE on DATA/Testing when present, next to the mean-image baseline.")
    p.add_argument("--data", required=True, type=Path, help="image folder (class subfolders or flat)")
    p.add_argument("--out", required=True, type=Path, metavar="PRIOR", help="folder to write the prior to")
    p.add_argument("--size", type=positive_int, default=DEFAULT_SIZE,
                   help=f"image side the images are resized to; use the model's input size (default: {DEFAULT_SIZE})")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image channels (default: 1, grey)")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs (default: 30)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default: 64)")
    p.add_argument("--latent-channels", type=positive_int, default=4,
                   help="channels of the latent code, which is SIZE/4 per side (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p
