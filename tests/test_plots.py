"""Figures: correct grey polarity, stated clipping, signed scales, 2D and 3D."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from counterlens.errors import InputError
from counterlens.viz.plots import (case_figure, display_image, display_map, figure_png, map_scale, overlay_png,
                                   plot_attributions)


def test_display_image_keeps_polarity_and_value_range():
    img = np.zeros((1, 8, 8), np.float32)
    img[0, 2, 3] = 1.0
    shown = display_image(img)
    assert shown.shape == (8, 8) and shown[2, 3] == 1.0 and shown[0, 0] == 0.0
    hu = np.full((1, 4, 4), -1000.0, np.float32)
    hu[0, 0, 0] = 400.0
    shown = display_image(hu, value_range=(-1000, 1000))
    assert shown[0, 0] == pytest.approx(0.7) and shown[1, 1] == 0.0
    rgb = display_image(np.random.rand(3, 5, 6))
    assert rgb.shape == (5, 6, 3)
    vol = np.random.rand(1, 7, 5, 5)
    np.testing.assert_allclose(display_image(vol, (0, 1)), vol[0, 3])
    np.testing.assert_allclose(display_map(vol[0]), vol[0, 3])
    with pytest.raises(InputError):
        display_image(np.zeros((2, 2, 2, 2, 2)))


def test_map_scale_clips_at_the_stated_percentile():
    a = np.linspace(0, 1, 1001)
    vmin, vmax, signed = map_scale(a, clip_percentile=1.0)
    assert not signed and vmin == 0 and vmax == pytest.approx(0.99)
    vmin, vmax, signed = map_scale(np.concatenate([-a, a]), clip_percentile=0.0)
    assert signed and vmin == -1.0 and vmax == 1.0
    assert map_scale(np.zeros(10))[1] == 1.0     # an all-zero map still draws
    with pytest.raises(InputError, match="clip_percentile"):
        map_scale(a, clip_percentile=60)


def test_figures_render_to_png():
    x = torch.rand(3, 1, 16, 16)
    maps = {"gradcam": torch.rand(3, 16, 16), "integrated_gradients": torch.randn(3, 16, 16)}
    fig = plot_attributions(maps, x, titles=["a", "b", "c"])
    assert len(fig.axes) >= 3 * 3
    png = figure_png(fig)
    assert Image.open(io.BytesIO(png)).size[0] > 100
    one = overlay_png(x[0], maps["integrated_gradients"][0])
    assert Image.open(io.BytesIO(one)).format == "PNG"
    assert figure_png(case_figure(x[0], {k: v[0] for k, v in maps.items()}, title="case")).startswith(b"\x89PNG")
    vol = plot_attributions({"gradcam": torch.rand(1, 6, 16, 16)}, torch.rand(1, 1, 6, 16, 16))
    assert figure_png(vol).startswith(b"\x89PNG")
