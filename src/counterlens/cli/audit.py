"""``counterlens audit``: load a model and images, audit a region, write ``RUN/audit.json`` and ``RUN/audit.md``.

The audit itself is :func:`counterlens.metrics.shortcut.audit`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ..attribution.base import get_method
from ..errors import DataFileError, InputError
from ..metrics.shortcut import _num, audit
from .common import image_dataset, load_classifier, parse_params


def _parse_box(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    values = [int(v) for v in text.split(",")]
    if len(values) == 6 or len(shape) == 3:
        return _parse_box3d(text, values, shape)
    x0, y0, x1, y1 = values
    if len(shape) != 2:
        raise InputError(f"--region {text}: a box needs 2D images, these have spatial shape {shape}; pass a masks folder")
    h, w = shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InputError(f"--region {text}: the box x0,y0,x1,y1 must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} "
                         "(pixels of the images as the model sees them, x1 and y1 exclusive)")
    box = torch.zeros(shape, dtype=torch.bool)
    box[y0:y1, x0:x1] = True
    return box


def _parse_box3d(text: str, values: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """A box in a volume: x0,y0,z0,x1,y1,z1 (x along W, y along H, z along D: the slice index)."""
    if len(shape) != 3 or len(values) != 6:
        raise InputError(f"--region {text}: volumes take a box x0,y0,z0,x1,y1,z1 and images x0,y0,x1,y1; these "
                         f"have spatial shape {shape}")
    x0, y0, z0, x1, y1, z1 = values
    d, h, w = shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0 <= z0 < z1 <= d):
        raise InputError(f"--region {text}: the box x0,y0,z0,x1,y1,z1 must satisfy 0 <= x0 < x1 <= {w}, "
                         f"0 <= y0 < y1 <= {h} and 0 <= z0 < z1 <= {d} (voxels of the volumes as the model sees them, "
                         "x1, y1 and z1 exclusive)")
    box = torch.zeros(shape, dtype=torch.bool)
    box[z0:z1, y0:y1, x0:x1] = True
    return box


def audit_cmd(args) -> int:
    """``counterlens audit``: load model and images, audit the region, write ``RUN/audit.json``/``audit.md``."""
    from ..runs.dataset import MODEL_KEYS, data_info, data_spec
    from ..runs.pipeline import cases_of
    from ..runs.records import CaseResult
    from ..runs.spec import model_spec, package_versions, resolved_methods
    from ..runs.store import ShardWriter, prepare_run, read_spec, write_spec

    is_box = re.fullmatch(r"\s*\d+(\s*,\s*\d+){3}((\s*,\s*\d+){2})?\s*", str(args.region)) is not None
    if not is_box and not Path(args.region).is_dir():
        raise InputError(f"--region {args.region}: pass a folder of masks named like the images (one per image "
                         "stem) or a box x0,y0,x1,y1 in pixels (volumes: x0,y0,z0,x1,y1,z1)")
    clf = load_classifier(args)
    data = Path(args.data)
    dataset, diagnosis = image_dataset(clf, data, masks=None if is_box else Path(args.region),
                                       limit=getattr(args, "limit", None), one_size=True,
                                       window=getattr(args, "window", "auto"))
    images, masks, labels, rows, failed = [], [], [], [], []
    for i in range(len(dataset)):
        try:
            img, label, mask = dataset.load(i)
            if images and img.shape != images[0].shape:
                raise DataFileError(dataset.records[i].path, f"shape {img.shape} differs from the first image's "
                                                             f"{images[0].shape}; resize the images to one size")
        except DataFileError as exc:
            failed.append((dataset.records[i], str(exc)))
            continue
        images.append(img)
        masks.append(mask if mask is not None else np.zeros(img.shape[1:], bool))
        labels.append(label)
        rows.append(dataset.records[i])
    if not images:
        raise InputError(f"--data {data}: no image could be read ({failed[0][1] if failed else 'empty'})")
    x = torch.from_numpy(np.stack(images))
    region = _parse_box(args.region, tuple(x.shape[2:])) if is_box else torch.from_numpy(np.stack(masks))
    y = torch.tensor(labels) if all(v is not None for v in labels) else None
    methods = [get_method(m).name for m in (getattr(args, "methods", None) or [])]
    params = parse_params(getattr(args, "param", None))
    batch_size, seed = getattr(args, "batch_size", 64), getattr(args, "seed", 0)
    resolved = resolved_methods(methods, params, batch_size, seed)     # fails early on a bad parameter
    out = Path(args.out)
    spec = {"model": model_spec(clf, str(args.model)), "target": "predicted", "seed": seed,
            "data": data_spec(dataset, data), "data_info": data_info(dataset, diagnosis.loading), "methods": resolved, "device": str(clf.device),
            "versions": package_versions()}
    prepare_run(out, spec, compare=(*MODEL_KEYS, "data", "methods"), overwrite=getattr(args, "overwrite", False),
                force=getattr(args, "force", False))
    result, extras = audit(clf, x, region, methods, y, batch_size=batch_size, seed=seed,
                           n_random=getattr(args, "n_random", 8), inpaint=getattr(args, "inpaint", "normalized"),
                           min_flip_rate=getattr(args, "min_flip_rate", 0.1), params=params, return_details=True)
    result.update(model=str(args.model), data=str(data), region=str(args.region), n_failed=len(failed))
    write_spec(out, {**read_spec(out), "audit": {k: result[k] for k in ("region", "inpaint", "n_random", "decision_rule")}})
    names = clf.class_names(clf.n_classes)
    by_file = {c.file: c for c in cases_of(dataset)}
    records = [CaseResult.failure(by_file[str(rec.path)], error) for rec, error in failed]
    n = len(extras["index"])
    for j, i in enumerate(extras["index"].tolist()):
        p = int(extras["pred"][j])
        records.append(CaseResult(
            case=by_file[str(rows[i].path)], prediction=p, prediction_name=names[p], probs=extras["probs"][j].tolist(),
            image=images[i], mask=extras["region"][j].numpy(),
            maps={m: extras["maps"][m][j].numpy() for m in methods}, targets={m: p for m in methods},
            seconds={m: extras["seconds"][m] / n for m in methods}))
    with ShardWriter(out) as writer:
        for start in range(0, len(records), 64):          # one array file per 64 cases
            writer.write(records[start:start + 64])
    result["per_image"] = [{"path": str(rows[i].path), "prediction": names[int(extras["pred"][j])],
                            "prediction_region_removed": names[int(extras["pred_region"][j])],
                            "flipped": bool(extras["flipped"][j]), "random_flip_rate": _num(extras["random_flips"][j])}
                           for j, i in enumerate(extras["index"].tolist())]
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    (out / "audit.md").write_text(_markdown(result))
    print(result["verdict"])
    if not getattr(args, "quiet", False):
        print(f"audit written to {out / 'audit.json'} and {out / 'audit.md'}")
    if not getattr(args, "no_report", False):
        from ..viz.report import write_report
        report = write_report(out)
        if not getattr(args, "quiet", False):
            print(f"report: {report}")
    return 3 if getattr(args, "fail_on_shortcut", False) and result["relies_on_region"] else 0


def _markdown(result: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["# Shortcut audit", "", f"Model `{result['model']}`, data `{result['data']}`, region `{result['region']}`.",
             "", result["verdict"], "", "| measure | value |", "|---|---|",
             f"| relies on region | {'yes' if result['relies_on_region'] else 'no'} |",
             f"| region flip rate | {fmt(result['region_flip_rate'])} |",
             f"| random flip rate | {fmt(result['random_flip_rate'])} |",
             (f"| images with the region | {result['n_images']} ({result['n_without_region']} without, "
              f"{result['n_failed']} unreadable) |"), ""]
    if result["methods"]:
        lines += ["| method | mass lift | confounder sensitivity | relevance mass |", "|---|---|---|---|"]
        lines += [f"| {m} | {fmt(v['mass_lift'])} | {fmt(v['confounder_sensitivity'])} | {fmt(v['relevance_mass'])} |"
                  for m, v in result["methods"].items()] + [""]
    return "\n".join([*lines, f"Decision rule: {result['decision_rule']['text']}.", ""])
