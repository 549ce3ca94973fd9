"""``counterlens run SPEC.yaml``: the schema read from the parser, a message per wrong key, the example
spec, and a run re-made bit for bit from its own ``run.yaml``."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from counterlens import open_run
from counterlens.cli import build_parser, main
from counterlens.cli.run_spec import command_options
from counterlens.errors import InputError
from counterlens.runs.spec_file import plan, read_spec_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "brain_tumour_notebook.yaml"
OPTIONS = command_options(build_parser())


def _plan(spec, out="RUN"):
    return plan(spec, OPTIONS, out=out)


def _error(spec) -> str:
    with pytest.raises(InputError) as exc:
        _plan(spec)
    text = str(exc.value)
    assert "\n" not in text
    return text


BASE = {"model": {"path": "m"}, "data": {"path": "d"}}


def test_example_spec_validates_with_the_notebook_settings():
    steps = _plan(read_spec_file(EXAMPLE), out=None)
    assert [s.command for s in steps] == ["explain", "evaluate", "report"]
    explain = steps[0].argv
    assert explain[explain.index("--methods") + 1] == \
        "gradcam,integrated_gradients,smoothgrad,guided_backprop,lime,kernel_shap"
    params = {explain[i + 1] for i, w in enumerate(explain) if w == "--param"}
    assert params == {"integrated_gradients.steps=80", "smoothgrad.samples=80", "lime.samples=1000",
                      "kernel_shap.samples=1000"}
    assert explain[explain.index("--data") + 1] == "demo-run-work/data/Testing"
    assert explain[explain.index("--model") + 1] == "demo-run-work/model"
    assert "--no-report" in explain                          # the report is written once, by the report step
    assert steps[2].argv == ["notebook-run", "--colormap", "jet", "--alpha", "0.4", "--absolute",
                             "--clip-percentile", "0.5", "--figures"]   # the notebook's overlays: jet, 0.4, |map|
    build_parser().parse_args(["explain", *explain])         # what the command itself accepts


def test_dry_run_prints_the_commands(capsys):
    assert main(["run", str(EXAMPLE), "--dry-run", "--out", "elsewhere"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("counterlens explain --out elsewhere --model demo-run-work/model")
    assert out[-1] == ("counterlens report elsewhere --colormap jet --alpha 0.4 --absolute --clip-percentile 0.5 "
                       "--figures")


def test_every_option_of_a_command_is_a_key():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("explain", "counterfactual", "audit", "evaluate", "report"):
        dests = {a.dest for a in sub.choices[command]._actions} - {"help", "out", "run"}
        text = _error({**BASE, command: {"zzz": 1}})
        allowed = set(text.split("allowed: ")[1].split(", "))
        assert text.startswith(f"{command}.zzz: unknown key") and allowed == dests


@pytest.mark.parametrize("spec, words", [
    ({"explian": {}}, ["'explian'", "allowed: out, model, data, explain"]),
    ({**BASE}, ["runs nothing", "explain, counterfactual"]),
    ({"data": {"path": "d"}, "explain": {}}, ["explain needs model.path", "--model"]),
    ({**BASE, "explain": {"batch_size": "big"}}, ["explain.batch_size", "'big'", "positive integer or 'auto'"]),
    ({**BASE, "explain": {"map_dtype": "int8"}}, ["explain.map_dtype", "allowed: float32, float16"]),
    ({**BASE, "explain": {"quiet": "yes"}}, ["explain.quiet", "not true or false"]),
    ({**BASE, "explain": {"methods": ["gradcam", "nonsense"]}}, ["explain.methods", "nonsense", "available:"]),
    ({**BASE, "explain": {"methods": {"integrated_gradients": {"stepz": 8}}}},
     ["explain.methods.integrated_gradients", "no parameter stepz", "steps=50"]),
    ({**BASE, "explain": {"methods": {"lime": {"samples": "many"}}}}, ["explain.methods.lime", "samples"]),
    ({**BASE, "explain": {"param": {"gradcam": {"relu": 3}}}}, ["explain.param.gradcam", "true or false"]),
    ({"model": {"path": "m", "colour": 1}, "data": {"path": "d"}, "explain": {}}, ["model.colour", "allowed:", "precision"]),
    ({**BASE, "data": {"path": "d", "folder": "x"}, "explain": {}}, ["data.folder", "allowed:", "masks", "limit"]),
    ({"model": {"path": "m", "size": [64, 64, 64, 64]}, "data": {"path": "d"}, "explain": {}}, None),
    ({"model": {"path": "m", "value_range": [0]}, "data": {"path": "d"}, "explain": {}}, ["model.value_range", "2 values"]),
    ({"model": {"path": "m", "output_head": "softmax"}, "data": {"path": "d"}, "explain": {}},
     ["model.output_head", "allowed: auto, logits, probabilities, sigmoid, multilabel"]),
    ({**BASE, "counterfactual": {"schedule": "fast"}}, ["counterfactual.schedule", "adaptive, bisection"]),
    ({**BASE, "audit": {}}, ["audit needs audit.region", "--region"]),
    ({**BASE, "report": {"page_size": 0}}, ["report.page_size", "positive integer"]),
    ({**BASE, "explain": "gradcam"}, ["explain: a mapping of options"]),
])
def test_each_wrong_key_is_named_with_what_it_allows(spec, words):
    if words is None:                 # the checks of the command itself still apply (here: at run time, one line)
        steps = _plan(spec)
        assert steps[0].argv[steps[0].argv.index("--size") + 1:][:4] == ["64"] * 4
        return
    text = _error(spec)
    for word in words:
        assert word in text, (word, text)


def test_values_become_the_options_of_the_commands():
    spec = {"out": "ignored", "model": {"path": "m", "size": [32, 32], "preprocess": [{"normalize": {"mean": [0.5],
                                                                                                   "std": [0.25]}}],
                                        "classes": ["a", "b"], "trust_model_file": True},
            "data": {"path": "d", "limit": 4, "masks": "mk"},
            "explain": {"methods": "gradcam, saliency", "param": ["gradcam.relu=false"], "overwrite": False},
            "counterfactual": {"steps": 20, "target": 1},
            "evaluate": {"metrics": ["sparseness", "entropy"], "masks": "other"}, "report": False}
    explain, cf, ev = _plan(spec, out="R")
    args = build_parser().parse_args(["explain", *explain.argv])
    assert args.out == Path("R") and args.size == [32, 32] and args.classes == ["a", "b"] and args.trust_model_file
    assert args.preprocess == [{"normalize": {"mean": [0.5], "std": [0.25]}}] and args.limit == 4
    assert args.methods == ["gradcam", "saliency"] and args.param == ["gradcam.relu=false"] and not args.overwrite
    assert args.masks == Path("mk") and not args.no_report                   # no report section: as on the CLI
    args = build_parser().parse_args(["counterfactual", *cf.argv])
    assert args.steps == 20 and args.target == "1" and args.limit == 4
    args = build_parser().parse_args(["evaluate", *ev.argv])
    assert args.run == Path("R") and args.metrics == ["sparseness", "entropy"] and args.masks == Path("other")


def test_errors_on_the_command_line_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "explain": {"methods": ["gradcam"], "seeds": 3}}))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("counterlens: error: explain.seeds: unknown key; allowed:") and "\n" not in err
    (tmp_path / "list.yaml").write_text("- explain\n")
    assert main(["run", str(tmp_path / "list.yaml")]) == 2
    assert "a spec is a mapping" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("explain: [\n")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "no such spec file" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**BASE, "explain": {}}))
    assert main(["run", str(good)]) == 2
    assert "out: give the run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic data and a one-epoch model, through the CLI, at 32 pixels."""
    root = tmp_path_factory.mktemp("spec")
    data, model = root / "data", root / "model"
    assert main(["data", "synth", "brain-mri", "--out", str(data), "--n-train", "16", "--n-test", "12",
                 "--size", "32", "--seed", "5"]) == 0
    assert main(["train", "--data", str(data), "--arch", "brain-tumor-cnn", "--out", str(model), "--size", "32",
                 "--width", "0.25", "--epochs", "1", "--quiet"]) == 0
    return root, data, model


def _same_maps(a, b, methods):
    first, second = open_run(a), open_run(b)
    assert list(first.cases.path) == list(second.cases.path)
    for column in ("label", "prediction", "status"):
        assert list(first.cases[column]) == list(second.cases[column])
    for path in first.cases.path:
        for method in methods:
            x, y = first.map(path, method), second.map(path, method)
            assert x.dtype == y.dtype and np.array_equal(x, y), (path, method)
    return first, second


@pytest.mark.slow
def test_run_yaml_remakes_an_explain_run_bit_for_bit(tiny, capsys):
    root, data, model = tiny
    run, again = root / "run", root / "again"
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(run),
                 "--methods", "gradcam,smoothgrad", "--param", "smoothgrad.samples=6", "--param", "smoothgrad.noise=0.3",
                 "--seed", "7", "--limit", "6", "--images-per-batch", "4", "--workers", "1", "--quiet",
                 "--no-report"]) == 0
    assert main(["run", str(run / "run.yaml"), "--out", str(again)]) == 0
    first, second = _same_maps(run, again, ["gradcam", "smoothgrad"])
    assert len(first.cases) == 6
    assert first.spec["methods"] == second.spec["methods"] and second.spec["methods"]["smoothgrad"]["seed"] == 7
    assert second.spec["methods"]["smoothgrad"]["samples"] == 6 and second.spec["images_per_batch"] == 4
    assert (again / "report.html").exists()
    # the same seed by another route gives other noise: the equality above is not vacuous
    other = root / "other"
    assert main(["explain", "--model", str(model), "--data", str(data / "Testing"), "--out", str(other),
                 "--methods", "smoothgrad", "--param", "smoothgrad.samples=6", "--param", "smoothgrad.noise=0.3",
                 "--seed", "8", "--limit", "6", "--images-per-batch", "4", "--workers", "1", "--quiet",
                 "--no-report"]) == 0
    path = first.cases.path[0]
    assert not np.array_equal(first.map(path, "smoothgrad"), open_run(other).map(path, "smoothgrad"))


@pytest.mark.slow
def test_a_spec_run_records_its_spec_and_is_remade_with_masks(tiny, tmp_path, capsys):
    root, data, model = tiny
    spec = {"out": str(tmp_path / "first"),
            "model": {"path": str(model), "device": "cpu"},
            "data": {"path": str(data / "Testing"), "masks": str(data / "masks" / "tumor"), "limit": 4},
            "explain": {"methods": {"integrated_gradients": {"steps": 4, "baseline": "blur"}, "rise": {"samples": 32}},
                        "seed": 3, "workers": 1, "quiet": True},
            "report": {"clip_percentile": 1.0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0
    first = tmp_path / "first"
    recorded = open_run(first).spec["run_spec"]
    assert recorded["data"]["masks"] == str(data / "masks" / "tumor") and "out" not in recorded
    assert (first / "report.html").exists()
    assert main(["run", str(first / "run.yaml"), "--out", str(tmp_path / "second")]) == 0
    a, b = _same_maps(first, tmp_path / "second", ["integrated_gradients", "rise"])
    assert b.spec["methods"]["integrated_gradients"]["baseline"] == "blur"
    for case in a.cases.path:
        assert np.array_equal(a.mask(case), b.mask(case))


def test_the_handlers_are_the_commands_own():
    from counterlens.cli import COMMANDS
    from counterlens.cli.run_spec import HANDLERS
    assert all(COMMANDS[c] == h for c, h in HANDLERS.items()) and set(HANDLERS) == set(OPTIONS)


def test_a_run_record_with_counterfactuals_and_an_audit_is_a_spec():
    rec = {"model": {"source": "m", "classes": ["a", "b"], "output": "logits", "overrides": {"input_size": [32, 32]}},
           "data": {"path": "/d"}, "data_info": {"images": 5, "with_masks": 0}, "device": "cpu",
           "target": "predicted", "seed": 2, "methods": {"saliency": {"batch_size": 64, "absolute": True}},
           "counterfactual": {"target": "other", "threshold": 0.5, "steps": 30, "candidates": 1, "l1": 1.0, "l2": 1.0,
                              "tv": 0.0, "schedule": "adaptive", "early_stop": None, "batch_size": None, "seed": 2,
                              "editable_masks": "/brain", "prior": "", "train_data": "", "prototypes": False,
                              "proto_weight": None},
           "audit": {"region": "0,0,4,4", "inpaint": "normalized", "n_random": 3, "decision_rule": {"text": "x"}},
           "versions": {"counterlens": "0"}}
    steps = _plan(read_spec_file_from(rec))
    assert [s.command for s in steps] == ["counterfactual", "audit"]          # no images_per_batch: not an explain run
    cf = build_parser().parse_args(["counterfactual", *steps[0].argv])
    assert (cf.steps, cf.seed, cf.editable_masks, cf.limit, cf.size) == (30, 2, Path("/brain"), 5, [32, 32])
    assert cf.prior is None and not cf.prototypes and cf.classes == ["a", "b"] and cf.device == "cpu"
    audit = build_parser().parse_args(["audit", *steps[1].argv])
    assert (audit.region, audit.n_random, audit.methods, audit.seed) == ("0,0,4,4", 3, ["saliency"], 2)
    assert audit.param == ["saliency.batch_size=64", "saliency.absolute=true"]


def read_spec_file_from(rec):
    from counterlens.runs.spec_file import from_run_record, is_run_record
    assert is_run_record(rec)
    return from_run_record(rec)
