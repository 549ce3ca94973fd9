"""How a map is drawn over its image (colour map, alpha, |map|, clip), closed-form: in the figures
(:class:`~counterlens.viz.plots.OverlayStyle`), the report's map PNGs, colour bars, slice viewers and
opacity sliders, from Python, the command line and a spec file (the brain-tumour notebook example)."""
import base64
import io
import re

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

import counterlens
from counterlens.cli import build_parser, main
from counterlens.cli.run_spec import command_options
from counterlens.errors import InputError
from counterlens.runs.spec_file import plan, read_spec_file
from counterlens.viz.plots import OverlayStyle, overlay, overlay_rgba, plot_attributions
from counterlens.viz.report import write_report
from counterlens.viz.report_images import css_gradient, map_png
from counterlens.viz.report_volumes import volume_view
from test_report import make_run
from test_spec_run import EXAMPLE

NOTEBOOK = {"cmap": "jet", "alpha": 0.4, "absolute": True, "clip_percentile": 0.5}


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_absolute_shows_minus_v_as_plus_v_and_jet_ends_at_jet_of_one():
    amap = np.linspace(-1, 1, 101, dtype=np.float32).reshape(1, 101)      # -v and +v at mirrored columns
    rgba, norm, cmap = overlay_rgba(amap, OverlayStyle(**NOTEBOOK))
    np.testing.assert_array_equal(rgba[0, :50], rgba[0, 100:50:-1])       # |map|: -v looks exactly like +v
    vmax = np.percentile(np.abs(amap), 99.5)
    assert cmap.name == "jet" and norm.vmin == 0 and norm.vmax == pytest.approx(vmax)
    np.testing.assert_allclose(rgba[0, -1, :3], colormaps["jet"](1.0)[:3])  # the max: jet(1.0), at opacity alpha
    assert rgba[0, -1, 3] == pytest.approx(0.4) and rgba[0, 0, 3] == pytest.approx(0.4)
    assert rgba[0, 50, 3] == 0                                             # zero: the image shows
    np.testing.assert_allclose(rgba[0, 75, :3], colormaps["jet"](0.5 / vmax)[:3])
    assert rgba[0, 75, 3] == pytest.approx(0.4 * 0.5 / vmax)              # opacity follows |map| up to the clip
    signed, _, default = overlay_rgba(amap, OverlayStyle())                # default unchanged: signed RdBu_r, 0.75
    assert default.name == "RdBu_r" and not np.allclose(signed[0, 0, :3], signed[0, -1, :3])
    assert signed[0, -1, 3] == pytest.approx(0.75)
    _, _, named = overlay_rgba(amap, OverlayStyle(cmap="viridis"))         # a named map on a signed scale
    assert named.name == "viridis"


def test_figures_draw_and_state_the_settings():
    import matplotlib.pyplot as plt
    x = np.zeros((1, 1, 8, 8), np.float32)
    amap = np.zeros((1, 8, 8), np.float32)
    amap[0, 2, 3], amap[0, 5, 5] = -2.0, 2.0
    fig, ax = plt.subplots()
    overlay(ax, x[0], amap[0], **NOTEBOOK)
    drawn = ax.images[1].get_array()
    np.testing.assert_allclose(drawn[2, 3], drawn[5, 5])
    np.testing.assert_allclose(drawn[5, 5], [*colormaps["jet"](1.0)[:3], 0.4])
    assert fig.axes[-1].get_ylabel() == "|map| (jet)"                   # the colour bar says what it shows
    plt.close(fig)
    fig = counterlens.plot_attributions({"ig": amap}, x, **NOTEBOOK)     # the public API
    assert fig._suptitle.get_text() == ("colour scale: |map| on jet, clipped at the 99.5th percentile of |map|, "
                                        "opacity 0.4 at the clip (fading with |map|)")
    plt.close(fig)
    fig = plot_attributions({"ig": amap}, x)
    assert "signed maps on RdBu_r centred on 0, non-negative ones on inferno" in fig._suptitle.get_text()
    plt.close(fig)


@pytest.mark.parametrize("kwargs, words", [
    ({"cmap": "jett"}, ["cmap='jett'", "not a matplotlib colour map", "jet, viridis"]),
    ({"cmap": 3}, ["cmap=3", "jet, viridis"]),
    ({"alpha": 0}, ["alpha=0", "(0, 1]"]),
    ({"alpha": 1.5}, ["alpha=1.5", "(0, 1]"]),
    ({"alpha": True}, ["alpha=True", "(0, 1]"]),
    ({"absolute": "yes"}, ["absolute='yes'", "True"]),
    ({"clip_percentile": 50}, ["clip_percentile=50", "[0, 50)"]),
])
def test_wrong_settings_are_one_line_errors(kwargs, words):
    x = np.zeros((1, 1, 4, 4), np.float32)
    for call in (lambda: plot_attributions({"m": np.ones((1, 4, 4))}, x, **kwargs),
                 lambda: write_report("no-such-run", **kwargs)):            # checked before the run is opened
        with pytest.raises(InputError) as exc:
            call()
        text = _one_line(exc)
        for word in words:
            assert word in text, (word, text)


def _palette_rgba(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    palette = np.frombuffer(bytes(img.getpalette()[:768]), np.uint8).reshape(256, 3)
    alpha = np.frombuffer(img.info["transparency"], np.uint8)
    return np.concatenate([palette, alpha[:, None]], axis=1)


def _jet_palette() -> np.ndarray:
    return np.round(colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def test_map_png_uses_the_colour_map_and_absolute_value():
    amap = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    png, scale = map_png(amap, 0.0, cmap="jet", absolute=True)
    assert scale == {"vmin": 0.0, "vmax": pytest.approx(1.0), "signed": False, "cmap": "jet"}
    np.testing.assert_array_equal(_palette_rgba(png)[:, :3], _jet_palette())
    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    np.testing.assert_array_equal(rgba[0, 0], rgba[-1, -1])                  # -1 and +1 alike
    assert tuple(rgba[-1, -1]) == (*_jet_palette()[255], 255)               # the max: jet(1.0), opaque in the PNG
    view = volume_view(np.random.default_rng(0).random((1, 4, 6, 6)), {"ig": amap[None].repeat(4, 0)[:, :6, :6] - 0.5},
                       (0, 1), 0.0, cmap="jet", absolute=True)
    assert not view["methods"][0]["signed"] and view["methods"][0]["labels"][2] == "0"
    sprite = base64.b64decode(view["planes"][0]["maps"][0]["uri"].split(",", 1)[1])
    np.testing.assert_array_equal(_palette_rgba(sprite)[:, :3], _jet_palette())


def _map_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(u) for u in re.findall(r'<img class="map" alt="[^"]*" src="data:image/png;base64,([^"]+)"',
                                                     html)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("style") / "run", n=3, size=32, n_cf=1, failed=0, extras=False)


def test_report_uses_the_settings_everywhere(tiny_run):
    html = write_report(tiny_run, **NOTEBOOK).read_text()
    pngs = _map_pngs(html)
    assert pngs and all((_palette_rgba(p)[:, :3] == _jet_palette()).all() for p in pngs)   # every map in jet
    assert '<html lang="en" data-map-opacity="0.4">' in html                # the sliders start at 40%
    assert ":root { --map-opacity: 0.4; } figure.sv { --sv-opacity: 0.4; }" in html
    assert f"--grad-map-positive: {css_gradient('jet')};" in html         # the maps' colour bars: jet
    assert f"--grad-signed: {css_gradient('RdBu_r')};" in html            # the counterfactual difference: as before
    assert 'class="strip positive"' in html and 'class="strip signed"' in html
    summary = re.search(r'<td id="map-display">(.*?)</td>', html).group(1)
    assert summary.startswith("|map| on jet, clipped at the 99.5th percentile of |map|, opacity 0.4")
    again = write_report(tiny_run).read_text()                            # a re-write without settings keeps them
    assert 'data-map-opacity="0.4"' in again and all(
        (_palette_rgba(p)[:, :3] == _jet_palette()).all() for p in _map_pngs(again))
    default = write_report(tiny_run, cmap="auto", alpha=0.75, absolute=False).read_text()   # the default is what it was
    assert 'data-map-opacity="0.75"' in default
    assert "signed maps on RdBu_r centred on 0, non-negative ones on inferno" in default
    assert not any((_palette_rgba(p)[:, :3] == _jet_palette()).all() for p in _map_pngs(default))


def test_paged_report_pages_carry_the_settings(tmp_path):
    run = make_run(tmp_path / "run", n=3, size=32, n_cf=0, failed=0, extras=False)
    index = write_report(run, single_file_max=1, page_size=2, **NOTEBOOK)
    pages = [index, *sorted((index.parent / "gallery").glob("*.html"))]
    for page in pages:
        assert 'data-map-opacity="0.4"' in page.read_text(), page
    gallery = pages[1].read_text()
    assert all((_palette_rgba(p)[:, :3] == _jet_palette()).all() for p in _map_pngs(gallery))


def test_report_command_takes_the_options_and_refuses_wrong_ones(tiny_run, capsys):
    assert main(["report", str(tiny_run), "--colormap", "viridis", "--alpha", "0.5", "--absolute",
                 "--clip-percentile", "1"]) == 0
    html = (tiny_run / "report.html").read_text()
    assert 'data-map-opacity="0.5"' in html and "|map| on viridis, clipped at the 99th percentile" in html
    for argv, words in ((["--colormap", "jett"], ["--colormap", "'jett' is not a matplotlib colour map",
                                                  "jet, viridis"]),
                        (["--alpha", "0"], ["--alpha", "(0, 1]"]), (["--alpha", "x"], ["--alpha", "not a number"])):
        with pytest.raises(SystemExit):
            main(["report", str(tiny_run), *argv])
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (word, err)
    assert main(["report", str(tiny_run), "--clip-percentile", "60"]) == 2
    assert "--clip-percentile=60.0: pass a percentage in [0, 50)" in capsys.readouterr().err
    for argv in (["explain", "--model", "m", "--data", "d", "--out", "o"], ["evaluate", "RUN"]):   # they write it too
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--colormap", "jett"])
        assert "not a matplotlib colour map" in capsys.readouterr().err
        args = build_parser().parse_args([*argv, "--colormap", "jet", "--alpha", "0.4", "--absolute"])
        assert (args.colormap, args.alpha, args.absolute, args.clip_percentile) == ("jet", 0.4, True, None)


OPTIONS = command_options(build_parser())
BASE = {"model": {"path": "m"}, "data": {"path": "d"}, "explain": {}}


@pytest.mark.parametrize("section, words", [
    ({"colormap": "jett"}, ["report.colormap", "'jett'", "jet, viridis"]),
    ({"alpha": 1.5}, ["report.alpha", "1.5", "(0, 1]"]),
    ({"alpha": 0}, ["report.alpha", "(0, 1]"]),
    ({"absolute": "yes"}, ["report.absolute", "not true or false"]),
])
def test_spec_checks_the_report_settings_before_anything_runs(section, words):
    with pytest.raises(InputError) as exc:
        plan({**BASE, "report": section}, OPTIONS, out="RUN")
    text = _one_line(exc)
    for word in words:
        assert word in text, (word, text)


def test_the_notebook_example_reaches_the_renderer(monkeypatch, capsys):
    steps = plan(read_spec_file(EXAMPLE), OPTIONS, out="RUN")
    report = steps[-1]
    assert report.command == "report"
    seen = {}

    def fake_write_report(run, **kwargs):
        seen.update(kwargs, run=run)
        return run
    import counterlens.cli.report as cli_report
    import counterlens.viz.report
    monkeypatch.setattr(counterlens.viz.report, "write_report", fake_write_report)
    assert cli_report.report(build_parser().parse_args([report.command, *report.argv])) == 0
    assert {k: seen[k] for k in NOTEBOOK} == NOTEBOOK and seen["figures"] is True
    explain = build_parser().parse_args(["explain", *steps[0].argv, "--colormap", "jet"])   # explain: the same keys
    assert explain.colormap == "jet" and explain.no_report


def test_the_settings_stick_to_the_run_until_changed(tmp_path, capsys):
    """The report keeps its settings in RUN/run.yaml: evaluate, counterfactual, audit and report
    re-write it the same way unless told otherwise; run.yaml re-makes a run with the same report."""
    from counterlens.runs.store import read_spec
    run = make_run(tmp_path / "run", n=2, size=32, n_cf=0, failed=0, extras=False)
    assert main(["report", str(run), "--colormap", "jet", "--alpha", "0.4", "--absolute"]) == 0
    assert read_spec(run)["report"] == {"colormap": "jet", "alpha": 0.4, "absolute": True, "clip_percentile": 0.5}
    assert main(["report", str(run), "--clip-percentile", "2"]) == 0                  # one setting changed
    html = (run / "report.html").read_text()
    assert 'data-map-opacity="0.4"' in html and "|map| on jet, clipped at the 98th percentile" in html
    assert read_spec_file(run)["report"] == {"colormap": "jet", "alpha": 0.4, "absolute": True, "clip_percentile": 2.0}
    assert main(["report", str(run), "--no-absolute", "--colormap", "auto"]) == 0     # back to the defaults
    html = (run / "report.html").read_text()
    assert "signed maps on RdBu_r centred on 0, non-negative ones on inferno" in html
    assert read_spec(run)["report"] == {"colormap": None, "alpha": 0.4, "absolute": False, "clip_percentile": 2.0}
    capsys.readouterr()


def test_a_spec_says_absolute_false_as_no_absolute():
    options = command_options(build_parser())
    on, = plan({"out": "r", "report": {"absolute": True}}, options)
    off, = plan({"out": "r", "report": {"absolute": False, "colormap": "auto"}}, options)
    assert "--absolute" in on.argv and "--no-absolute" in off.argv and "auto" in off.argv
    with pytest.raises(InputError, match="report.absolute"):
        plan({"out": "r", "report": {"absolute": "yes"}}, options)
