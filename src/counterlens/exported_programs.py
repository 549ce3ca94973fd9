"""``torch.export`` programs (``.pt2``, ``torch.export.save``) as models: the check that an archive
holds only what a plain export of a plain module writes (``torch.export.load`` unpickles anything
else with ``weights_only=False``, so that needs ``trust_model_file=True``), loading it, and
:class:`ExportedModule`, the program as an ``nn.Module`` that takes any batch size.
:func:`counterlens.loading.load_model` recognises the archive and calls :func:`_load_export`.
"""
from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, UntrustedModelError

SMALL_STATIC_BATCH = 16   # a program exported with a fixed batch below this gets a warning (slow)


class ExportedModule(nn.Module):
    """A ``torch.export`` program as an ``nn.Module``.

    ``train()`` / ``eval()`` only set this wrapper's flag: the program's mode (dropout, BatchNorm)
    was fixed when it was exported (export in eval mode). A program exported with a static batch
    size ``batch`` is fed in chunks of that many rows (the last one zero-padded), so any batch works.
    ``exported_program``: the ``torch.export.ExportedProgram`` itself, from which the CAM methods
    and the sanity check build a view with hookable layers (``counterlens.attribution.graphs``).
    """

    def __init__(self, program: nn.Module, batch: int | None = None, exported_program=None):
        super().__init__()
        self.program = program
        self.batch = batch
        self.exported_program = exported_program

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        outs = []
        for chunk in x.split(self.batch):
            n = chunk.shape[0]
            if n < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch - n, *chunk.shape[1:]))])
            outs.append(self.program(chunk)[:n])
        return torch.cat(outs)


_PT2_FIXED = {"archive_format", "archive_version", "byteorder", "version", ".data/version",
              ".data/serialization_id"}
_PT2_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _pt2_pickled_parts(path: Path) -> list[str]:
    """What in a ``.pt2`` is not on the allow-list of a plain program (empty: safe to load).

    ``torch.export.load`` unpickles with ``weights_only=False`` payloads flagged ``use_pickle``,
    custom / opaque object constants, and ``.pt`` entries (sample inputs) that fail a safe load. So
    rather than look for those names, every entry must be one a plain export of a plain module
    writes: the fixed version files, ``models/<name>.json`` (the graph, JSON), the weight and
    constant configs (each entry ``use_pickle: false``, a plain file name that is not a custom or
    opaque object), the raw tensor files those configs name, and sample inputs that load with
    ``weights_only=True``. Anything else (another folder, a file no config names, a name with a
    sub-folder) is reported.
    """
    found, allowed, payloads = [], set(), {}
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable torch.export archive ({exc})") from exc
    with zf:
        names = zf.namelist()
        root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        tails = {n: n[len(root):] if n.startswith(root) else n for n in names}
        for name, tail in tails.items():
            folder, _, base = tail.rpartition("/")
            if folder in ("data/weights", "data/constants") and base.endswith("_config.json"):
                allowed.add(name)
                try:
                    config = json.loads(zf.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    found.append(f"{tail} (not a JSON config)")
                    continue
                for key, entry in (config.items() if isinstance(config, dict) else ()):
                    entry = entry if isinstance(entry, dict) else {}
                    file = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") or not _PT2_NAME.fullmatch(file) \
                            or file.startswith(("custom_obj", "opaque_obj")):
                        found.append(f"{tail}: {key} -> {file or '?'}")
                    else:
                        payloads[f"{root}{folder}/{file}"] = tail
        for name, tail in tails.items():
            folder, _, base = tail.rpartition("/")
            if name in allowed or name in payloads or tail in _PT2_FIXED or name.endswith("/"):
                continue
            if folder == "models" and base.endswith(".json") and _PT2_NAME.fullmatch(base):
                continue
            if folder == "data/sample_inputs" and base.endswith(".pt") and _PT2_NAME.fullmatch(base):
                try:
                    torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
                    continue
                except Exception:  # noqa: BLE001 - anything a safe load refuses
                    pass
            found.append(tail)
    return found


def _load_export(path: Path, trust: bool) -> nn.Module:
    pickled = _pt2_pickled_parts(path)
    if pickled and not trust:
        raise UntrustedModelError(
            f"{path} is a torch.export program with parts that are not plain tensors or graph JSON "
            f"({', '.join(pickled[:4])}); torch.export.load may unpickle them with weights_only=False, which can "
            "run arbitrary code hidden in the file. If you trust its origin, pass --trust-model-file (CLI) / trust_model_file=True; "
            "or re-export the plain module, or save a state_dict and load it with "
            "--factory package.module:function")
    program = torch.export.load(str(path))
    batch = None
    user = set(program.graph_signature.user_inputs)
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    if len(inputs) == 1 and isinstance(getattr(inputs[0].meta.get("val"), "shape", None), torch.Size):
        first = inputs[0].meta["val"].shape[0]
        batch = first if isinstance(first, int) else None
    if batch is not None and batch < SMALL_STATIC_BATCH:
        warnings.warn(f"{path} was exported with a fixed batch of {batch}: it will be fed {batch} row(s) per call, "
                      "which is slow for batched explanations and searches. Export it with a dynamic batch: "
                      "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))",
                      stacklevel=2)
    return ExportedModule(program.module(), batch, exported_program=program)
