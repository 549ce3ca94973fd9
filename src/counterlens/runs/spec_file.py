"""A run described in one YAML file (``counterlens run SPEC.yaml``): schema, validation, and the
command lines it stands for.

A spec has the sections ``model``, ``data``, ``explain``, ``counterfactual``, ``audit``,
``evaluate`` and ``report`` (each command runs when its section is there, in that order) and a
top-level ``out`` (the run directory). Every key of a command's section is one option of that
command, spelled as its destination (``--batch-size`` -> ``batch_size``); ``model`` holds the
model options every command shares (``path`` is ``--model``), ``data`` the data options (``path``
is ``--data``, ``masks``, ``limit``, ...). A value in ``model``/``data`` applies to every command
that has the option; the same key in a command's section wins there.

The options themselves are not listed here: the caller passes them as :class:`Option` rows read
from the command line's parser (:mod:`counterlens.cli.run_spec`), so a new flag is a new key.
``RUN/run.yaml`` (what a run directory records) is read as a spec too (:func:`from_run_record`).
Relative paths are relative to the current directory, as on the command line.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import CounterlensError, InputError

COMMANDS = ("explain", "counterfactual", "audit", "evaluate", "report")
SECTIONS = ("model", "data", *COMMANDS)
MODEL_KEYS = {"model": "path", "factory": "factory", "trust_model_file": "trust_model_file", "classes": "classes",
              "device": "device", "logits_output": "logits_output", "output_head": "output_head",
              "precision": "precision", "size": "size", "channels": "channels", "value_range": "value_range",
              "preprocess": "preprocess"}           # option dest -> key of the model section
DATA_KEYS = {"data": "path", "masks": "masks", "limit": "limit", "select": "select", "window": "window"}
RUN_DIR = {"out", "run"}
SPEC_KEY = "run_spec"                               # where run.yaml keeps the spec a run was started from                            # the run directory: the spec's ``out``, never a section key


@dataclass(frozen=True)
class Option:
    """One command-line option: ``dest`` (the spec key), ``flag`` (``--batch-size``; ``""`` for a
    positional), ``kind`` (``"switch"``, ``"toggle"`` for ``--x/--no-x``, ``"append"`` or
    ``"value"``), ``nargs``, ``choices`` and ``convert`` (the argparse type, which checks a value
    given as text)."""
    dest: str
    flag: str
    kind: str = "value"
    nargs: Any = None
    choices: tuple | None = None
    convert: Callable | None = None
    required: bool = False


@dataclass
class Step:
    """One command of a spec: its name and its argument list (as typed after ``counterlens``)."""
    command: str
    argv: list[str]

    def line(self) -> str:
        import shlex
        return "counterlens " + " ".join(shlex.quote(a) for a in [self.command, *self.argv])


def read_spec_file(path) -> dict:
    """The spec in ``path``: a spec file, or a run directory's ``run.yaml`` (converted)."""
    path = Path(path)
    if path.is_dir():
        path = path / "run.yaml"
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such spec file; pass a YAML file (or a run directory's run.yaml)") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path}: a spec is a mapping with the sections {', '.join(SECTIONS)} (got "
                         f"{type(spec).__name__})")
    return from_run_record(spec) if is_run_record(spec) else spec


def is_run_record(spec: dict) -> bool:
    """Whether ``spec`` is a run directory's ``run.yaml`` (rather than a spec file)."""
    return "versions" in spec or "store_version" in spec or "data_info" in spec


def from_run_record(rec: dict) -> dict:
    """The spec that re-makes the run ``rec`` (a ``run.yaml``): the same model, data, images,
    methods with every parameter, target, seed, batch sizes, and counterfactual settings."""
    model, data = rec.get("model") or {}, rec.get("data") or {}
    over = model.get("overrides") or {}
    spec: dict = {"model": {"path": model.get("source"), "device": rec.get("device")}, "data": {"path": data.get("path")}}
    for key, option in (("classes", "classes"), ("logits_output", "logits_output"), ("output", "output_head"),
                        ("precision", "precision")):
        if model.get(key) is not None:
            spec["model"][option] = model[key]
    for key, option in (("in_channels", "channels"), ("input_size", "size"), ("value_range", "value_range"),
                        ("preprocess", "preprocess")):
        if key in over:
            spec["model"][option] = over[key]
    images = (rec.get("data_info") or {}).get("images")
    if images:
        spec["data"]["limit"] = int(images)          # the same images: --limit picks them in a fixed order
    for key in ("masks", "select"):
        if data.get(key):
            spec["data"][key] = data[key]
    window = (data.get("read") or {}).get("window")
    if isinstance(window, (list, tuple)) and len(window) == 2:             # --window C,W as it was given
        spec["data"]["window"] = f"{float(window[0]):g},{float(window[1]):g}"
    elif window == "none":
        spec["data"]["window"] = "none"
    if "images_per_batch" in rec and rec.get("methods") is not None:      # an explain run
        spec["explain"] = {"methods": rec["methods"], "target": rec.get("target", "predicted"),
                           "seed": rec.get("seed", 0), "batch_size": rec.get("batch_size", 64),
                           "images_per_batch": rec["images_per_batch"], "map_dtype": rec.get("map_dtype", "float32")}
    cf = rec.get("counterfactual")
    if isinstance(cf, dict):
        section = {k: v for k, v in cf.items() if v not in (None, "")}
        if not section.get("prototypes"):
            section.pop("proto_weight", None)
        spec["counterfactual"] = section
    audit = rec.get("audit")
    if isinstance(audit, dict):
        spec["audit"] = {k: audit[k] for k in ("region", "inpaint", "n_random") if k in audit}
        spec["audit"].update(methods=rec.get("methods") or {}, seed=rec.get("seed", 0))
    shown = rec.get("report")
    if isinstance(shown, dict):                  # how its report drew the maps (written by the report)
        spec["report"] = {k: v for k, v in shown.items() if v is not None}
    given = rec.get(SPEC_KEY)
    if isinstance(given, dict):                  # started by `counterlens run`: its spec, with what the run resolved
        merged = {k: v for k, v in given.items() if k != "out"}
        for name, values in spec.items():
            if name == "data":
                kept = {} if {"limit", "select"} & set(given.get("data") or {}) else {"limit": values.get("limit")}
                merged["data"] = {**values, **(given.get("data") or {}), **kept}
            elif isinstance(merged.get(name), dict):
                merged[name] = {**merged[name], **values}
            else:
                merged[name] = values
        return merged
    with_masks = (rec.get("data_info") or {}).get("with_masks")
    if with_masks and not data.get("masks") and "explain" in spec:
        import warnings
        warnings.warn(f"the run had masks for {with_masks} images, but its run.yaml does not say from which folder: "
                      "the new run has none unless the spec gives data.masks", stacklevel=2)
    return spec


def record_spec(run_dir, spec: dict) -> None:
    """Keep ``spec`` (as given to ``counterlens run``, without ``out``) in ``RUN/run.yaml`` under
    ``run_spec``, so the run directory says everything needed to make it again (masks, evaluate, report)."""
    from .store import read_spec, write_spec
    current = read_spec(Path(run_dir))
    if current:
        write_spec(Path(run_dir), {**current, SPEC_KEY: {k: v for k, v in spec.items() if k != "out"}})


def plan(spec: dict, options: dict[str, list[Option]], out=None) -> list[Step]:
    """Check ``spec`` against ``options`` (``{command: [Option, ...]}``, read from the parser) and
    return the commands it stands for, in order. Every wrong key is one :class:`InputError` that
    names the key and what it allows. ``out``: the run directory, replacing the spec's ``out``."""
    if not isinstance(spec, dict):
        raise InputError(f"a spec is a mapping with the sections {', '.join(SECTIONS)}")
    unknown = sorted(set(spec) - set(SECTIONS) - {"out"}, key=str)
    if unknown:
        raise InputError(f"unknown key {unknown[0]!r} in the spec; allowed: out, {', '.join(SECTIONS)}")
    for name in SECTIONS:
        if spec.get(name) is not None and not isinstance(spec[name], dict) and not (name == "report" and
                                                                                    isinstance(spec[name], bool)):
            raise InputError(f"{name}: a mapping of options (got {type(spec[name]).__name__} {spec[name]!r})")
    commands = [c for c in COMMANDS if spec.get(c) not in (None, False)]
    if not commands:
        raise InputError(f"the spec runs nothing: add one of the sections {', '.join(COMMANDS)}")
    run_dir = out if out is not None else spec.get("out")
    shared = {"model": (MODEL_KEYS, spec.get("model") or {}), "data": (DATA_KEYS, spec.get("data") or {})}
    for section, (names, values) in shared.items():
        allowed = sorted({names[o.dest] for c in COMMANDS for o in options.get(c, []) if o.dest in names})
        bad = sorted(set(values) - set(allowed), key=str)
        if bad:
            raise InputError(f"{section}.{bad[0]}: unknown key; allowed: {', '.join(allowed)}")
    report_section = spec.get("report")
    steps = []
    for command in commands:
        section = {} if spec[command] is True else dict(spec[command])
        by_dest = {o.dest: o for o in options[command]}
        allowed = sorted(d for d in by_dest if d not in RUN_DIR)
        bad = sorted(set(section) - set(allowed), key=str)
        if bad:
            raise InputError(f"{command}.{bad[0]}: unknown key; allowed: {', '.join(allowed)}")
        values: dict = {}
        for section_name, (names, shared_values) in shared.items():
            for dest, key in names.items():
                if dest in by_dest and shared_values.get(key) is not None:
                    values[dest] = (f"{section_name}.{key}", shared_values[key])
        values.update({k: (f"{command}.{k}", v) for k, v in section.items()})
        if command != "report" and report_section not in (None, False) and "no_report" in by_dest:
            values["no_report"] = ("report", True)        # the report is written once, at the end
        missing = [d for d, o in by_dest.items() if o.required and d not in values and d not in RUN_DIR]
        if missing:
            key = {**{d: f"model.{k}" for d, k in MODEL_KEYS.items()}, **{d: f"data.{k}" for d, k in DATA_KEYS.items()}}
            raise InputError(f"{command} needs {key.get(missing[0], f'{command}.{missing[0]}')} "
                             f"({by_dest[missing[0]].flag or missing[0]})")
        argv = _run_dir_args(by_dest, str(run_dir))
        for dest, (where, value) in values.items():
            argv += _option_args(by_dest[dest], where, value, command)
        steps.append(Step(command, argv))
    if run_dir is None:                       # said after the keys, so a spec without out can be checked
        raise InputError("out: give the run directory in the spec (out: RUN) or with --out RUN")
    return steps


def _run_dir_args(by_dest: dict, run_dir: str) -> list[str]:
    if "out" in by_dest and by_dest["out"].flag:
        return [by_dest["out"].flag, run_dir]
    return [run_dir] if "run" in by_dest else []


def _option_args(opt: Option, where: str, value, command: str) -> list[str]:
    """The command-line words of one spec value, checked with the option's own type and choices."""
    if value is None:
        return []
    if opt.kind in ("switch", "toggle"):
        if not isinstance(value, bool):
            raise InputError(f"{where}: {value!r} is not true or false")
        if opt.kind == "toggle":                 # --absolute / --no-absolute: false is said, not left out
            return [opt.flag if value else "--no-" + opt.flag[2:]]
        return [opt.flag] if value else []
    if opt.dest == "methods":
        return _methods_args(opt, where, value, command)
    if opt.kind == "append":
        return _param_args(opt, where, value)
    if opt.dest == "preprocess" and isinstance(value, list):
        value = json.dumps(value)
    if opt.nargs in ("+", "*") or isinstance(opt.nargs, int):
        items = value if isinstance(value, list) else [value]
        if isinstance(opt.nargs, int) and len(items) != opt.nargs:
            raise InputError(f"{where}: {value!r} must be a list of {opt.nargs} values")
        if not items and opt.nargs == "+":
            raise InputError(f"{where}: give at least one value")
        words = [_word(opt, where, v) for v in items]
    elif isinstance(value, list) and _is_comma_list(opt):
        words = [",".join(_word(opt, where, v) for v in value)]
    else:
        words = [_word(opt, where, value)]
    return [opt.flag, *words] if opt.flag else words


def _is_comma_list(opt: Option) -> bool:
    return getattr(opt.convert, "__name__", "") == "comma_list"


def _word(opt: Option, where: str, value) -> str:
    """``value`` as the text the option takes; checked by its type and choices."""
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and opt.convert not in (None, str)):
        raise InputError(f"{where}: {value!r} is not a single value ({_expect(opt)})")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if opt.convert is not None:
        try:
            converted = opt.convert(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise InputError(f"{where}: {value!r} is not valid ({exc}; {_expect(opt)})") from None
    else:
        converted = text
    if opt.choices is not None and converted not in opt.choices:
        raise InputError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(str, opt.choices))}")
    return text


def _expect(opt: Option) -> str:
    if opt.choices:
        return "one of " + ", ".join(map(str, opt.choices))
    name = getattr(opt.convert, "__name__", "text")
    return {"int": "an integer", "float": "a number", "positive_int": "a positive integer",
            "auto_or_positive_int": "a positive integer or 'auto'", "comma_list": "a list or a comma-separated text",
            "Path": "a path", "share": "a number between 0 and 1"}.get(name, f"as for {opt.flag or opt.dest}")


def _methods_args(opt: Option, where: str, value, command: str) -> list[str]:
    """``methods``: a list (or comma text) of names, or a mapping ``{method: {param: value}}``,
    checked against the method registry (names and parameters)."""
    from ..attribution.base import METHODS, check_params, get_method
    params: dict = {}
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict):
        params = value
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: a list of method names or a mapping method: {{parameter: value}} "
                         f"(got {value!r}); methods: {', '.join(sorted(METHODS))}")
    names = []
    for name in value:
        if name == "all" and command == "explain":
            names.append(name)
            continue
        try:
            names.append(get_method(name).name)
        except CounterlensError as exc:
            raise InputError(f"{where}: {exc}") from None
    words = [opt.flag, ",".join(names)] if names else [opt.flag, ""]
    for method, given in params.items():
        if given is None:
            continue
        if not isinstance(given, dict):
            raise InputError(f"{where}.{method}: a mapping parameter: value (got {given!r})")
        try:
            check_params(get_method(method), dict(given))
        except CounterlensError as exc:
            raise InputError(f"{where}.{method}: {exc}") from None
        words += [w for k, v in given.items() for w in ("--param", f"{get_method(method).name}.{k}={_yaml(v)}")]
    return words


def _param_args(opt: Option, where: str, value) -> list[str]:
    """``param``: ``{method: {name: value}}`` or a list of ``METHOD.NAME=VALUE`` texts."""
    from ..attribution.base import check_params, get_method
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [w for v in value for w in (opt.flag, v)]
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InputError(f"{where}: a mapping method: {{parameter: value}} or a list of METHOD.NAME=VALUE "
                         f"(got {value!r})")
    words = []
    for method, given in value.items():
        try:
            info = get_method(method)
            check_params(info, dict(given))
        except CounterlensError as exc:
            raise InputError(f"{where}.{method}: {exc}") from None
        words += [w for k, v in given.items() for w in (opt.flag, f"{info.name}.{k}={_yaml(v)}")]
    return words


def _yaml(value) -> str:
    """A parameter value as ``--param`` reads it back (YAML, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()
