"""``--engine local|ray`` and the Ray options of ``explain``, ``counterfactual`` and ``evaluate``:
argparse types, and the engine a command runs on (checked before the model loads)."""
from __future__ import annotations

import argparse
import math

from ..errors import InputError


def _number(text: str, low: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number {'above' if strict else 'of at least'} {low:g}")
    return value


def cpus_arg(text: str) -> float:
    """argparse type: CPUs per Ray actor, a number above 0 (fractions allowed)."""
    return _number(text, 0.0, strict=True)


def gpus_arg(text: str) -> float:
    """argparse type: GPUs per Ray actor, 0 or more (fractions allowed)."""
    return _number(text, 0.0, strict=False)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine (default); ray: a Ray cluster through Ray Data, the same batches and "
                        "results (pip install 'counterlens[ray]'; the run directory must be on a filesystem every "
                        "node sees)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="--engine ray: the cluster to join (default: RAY_ADDRESS when set, else a cluster started "
                        "on this machine with its cores)")
    p.add_argument("--cpus-per-worker", type=cpus_arg, default=None,
                   help="--engine ray: CPUs each actor reserves, also its torch threads (default: 1)")
    p.add_argument("--gpus-per-worker", type=gpus_arg, default=None,
                   help="--engine ray: GPUs each actor reserves; fractions share a GPU (0.25: four actors per GPU) "
                        "(default: 1 when the cluster has GPUs and --device is not cpu, else 0)")


def engine_of(args, model: dict):
    """``"local"`` or a :class:`~counterlens.runs.engines.ray.RayEngine` for ``args``. ``model``:
    how Ray actors load the model (``source``, ``factory``, ``trust_model_file``, ``classes``,
    ``logits_output``, ``device``). Ray options without ``--engine ray`` are refused; a missing
    Ray is named with what to install."""
    if getattr(args, "engine", "local") == "local":
        ray_only = [flag for flag, name in (("--ray-address", "ray_address"), ("--cpus-per-worker", "cpus_per_worker"),
                                            ("--gpus-per-worker", "gpus_per_worker"))
                    if getattr(args, name, None) is not None]
        if ray_only:
            one = len(ray_only) == 1
            raise InputError(f"{', '.join(ray_only)} {'applies' if one else 'apply'} to --engine ray; add --engine ray "
                             f"or leave {'it' if one else 'them'} out")
        return "local"
    from ..runs.engines.ray import RayEngine, require_ray
    require_ray()
    which = model.get("logits_output")
    model = {**model, "logits_output": int(which) if str(which).lstrip("-").isdigit() else which}
    cpus = getattr(args, "cpus_per_worker", None)
    return RayEngine(address=getattr(args, "ray_address", None), workers=getattr(args, "workers", None),
                     threads=getattr(args, "threads", None), cpus_per_worker=cpus if cpus is not None else 1.0,
                     gpus_per_worker=getattr(args, "gpus_per_worker", None), model=model)


def model_args(args) -> dict:
    """How ``--model`` and its flags load the model, for the Ray actors."""
    from .common import model_overrides
    return {**model_overrides(args), "source": str(args.model), "factory": args.factory, "trust_model_file": args.trust_model_file,
            "classes": args.classes, "logits_output": getattr(args, "logits_output", None), "device": args.device,
            "output": getattr(args, "output_head", None), "precision": getattr(args, "precision", None)}
