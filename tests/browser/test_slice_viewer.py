"""The slice viewer of 3-D cases in a real browser (Chromium through Playwright): it opens at the
slice with the most attribution, the slider and the mouse wheel move through the slices, the plane
buttons switch between axial, coronal and sagittal views, the map choice and the overlay opacity
change what is drawn; offline, without console errors."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """Three synthetic 16 x 20 x 18 NIfTI volumes explained by an untrained reference 3-D CNN."""
    import counterlens as cl
    from counterlens.data.images import ImageFolder
    from counterlens.data.volumes import generate_volumes, write_nifti
    from counterlens.models import brain_tumor_cnn3d
    from counterlens.runs.dataset import explain_folder
    from counterlens.viz.report import write_report
    root = tmp_path_factory.mktemp("volume-report")
    vols = generate_volumes(3, size=(16, 20, 18), seed=0, split="test")
    for i, name in enumerate(vols.names):
        write_nifti(vols.images[i, 0], root / "data" / vols.classes[vols.labels[i]] / f"{name}.nii.gz", vols.spacing)
    torch.manual_seed(0)
    clf = cl.Classifier(brain_tumor_cnn3d(4, 1, (16, 20, 18), width=0.25).eval(), classes=vols.classes,
                        input_size=(16, 20, 18), value_range=(0, 1))
    out = root / "run"
    explain_folder(clf, ImageFolder(root / "data", size=(16, 20, 18), classes=vols.classes), out,
                   methods=["gradcam", "saliency"], workers=1, threads=1, progress=False)
    write_report(out)
    return out


def _state(viewer):
    return viewer.evaluate("""v => {
        const plane = Array.from(v.querySelectorAll('.sv-plane')).find(p => !p.hidden);
        const maps = Array.from(plane.querySelectorAll('.sv-map')).filter(m => !m.hidden);
        return {plane: plane.dataset.plane, slice: Number(plane.dataset.slice),
                max: Number(v.querySelector('.sv-slider').max), value: Number(v.querySelector('.sv-slider').value),
                pos: plane.querySelector('.sv-img').style.backgroundPosition,
                mapPos: maps.map(m => m.style.backgroundPosition), maps: maps.map(m => m.dataset.method),
                out: v.querySelector('.sv-pos').textContent,
                opacity: getComputedStyle(maps.length ? maps[0] : plane).opacity};
    }""")


def test_slice_viewer_slider_planes_map_and_opacity(volume_run, watched, artifacts):
    from counterlens.runs.store import open_run
    from counterlens.viz.report_volumes import peak_slice
    run = open_run(volume_run)
    page = watched.open(volume_run / "report.html")
    viewers = page.locator("#gallery figure.sv")
    assert viewers.count() == 3
    article = page.locator("#gallery article.case").first
    path = article.locator("h3").text_content()
    amap = run.map(path, "gradcam")
    viewer = article.locator("figure.sv")
    viewer.scroll_into_view_if_needed()
    s = _state(viewer)                      # opens on the axial slice with the most Grad-CAM mass
    assert s["plane"] == "axial" and s["max"] == 15 and s["slice"] == s["value"] == peak_slice(amap, "axial")
    assert s["maps"] == ["0"] and s["out"] == f"{s['slice'] + 1} / 16"

    target = 3 if s["slice"] != 3 else 9     # the slider moves every layer to the tile of that slice
    viewer.locator(".sv-slider").fill(str(target))
    moved = _state(viewer)
    assert moved["slice"] == target and moved["pos"] != s["pos"] and moved["mapPos"] == [moved["pos"]]
    assert moved["out"] == f"{target + 1} / 16"
    cols = 4                                 # 16 axial tiles in a 4 x 4 sprite: slice 3 is column 3, row 0
    r, c = divmod(target, cols)
    assert moved["pos"] == f"{100 * c / (cols - 1):g}% {100 * r / (cols - 1):g}%"

    viewer.locator(".sv-view").first.hover()
    page.mouse.wheel(0, 120)                 # the wheel steps one slice
    assert _state(viewer)["slice"] == target + 1

    viewer.locator("button[data-plane=coronal]").click()     # coronal: H = 20 slices, at its own peak
    s = _state(viewer)
    assert s["plane"] == "coronal" and s["max"] == 19 and s["slice"] == peak_slice(amap, "coronal")
    viewer.locator("button[data-plane=sagittal]").click()
    s = _state(viewer)
    assert s["plane"] == "sagittal" and s["max"] == 17 and s["slice"] == peak_slice(amap, "sagittal")
    assert viewer.locator("button.sv-plane-btn.on").text_content() == "sagittal"

    viewer.locator("select.sv-method").select_option(label="saliency")
    assert _state(viewer)["maps"] == ["1"]
    viewer.locator(".sv-peak").click()
    assert _state(viewer)["slice"] == peak_slice(run.map(path, "saliency"), "sagittal")
    viewer.locator(".sv-opacity").fill("20")
    assert float(_state(viewer)["opacity"]) == pytest.approx(0.2)
    viewer.locator("select.sv-method").select_option(label="none")
    assert _state(viewer)["maps"] == []
    viewer.screenshot(path=str(artifacts / "slice-viewer.png"))
    assert watched.problems == [] and watched.dialogs == []
    assert np.isfinite(amap).all()
