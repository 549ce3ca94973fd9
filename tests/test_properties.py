"""Property-based tests (hypothesis): the image readers round-trip what they are given and fail
only with DataFileError on any bytes; the argument parsers answer any text with a value or one
clear error."""
import argparse

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from counterlens.cli.common import batch_size_arg, comma_list, parse_params, positive_int, share
from counterlens.data.images import load_image
from counterlens.errors import CounterlensError, DataFileError
from counterlens.runs.store.layout import spec_differences

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))), st.sampled_from([".png", ".tif", ".npy"]))
def test_8bit_grey_images_round_trip(tmp_path, image, suffix):
    path = tmp_path / f"x{suffix}"
    if suffix == ".npy":
        np.save(path, image)
    elif suffix == ".tif":
        import tifffile
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path)
    out = load_image(path)
    assert out.dtype == np.float32 and out.shape == (1, *image.shape)
    np.testing.assert_array_equal(out[0], image.astype(np.float32) / 255)


@FAST
@given(arrays(np.uint16, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_16bit_png_round_trips(tmp_path, image):
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    out = load_image(path)
    np.testing.assert_allclose(out[0], image.astype(np.float32) / 65535, rtol=1e-6)


@FAST
@given(arrays(np.uint8, st.tuples(st.integers(2, 24), st.integers(2, 24), st.just(3))),
       st.integers(1, 48), st.sampled_from([1, 3]))
def test_resize_and_channels_give_the_asked_shape_in_range(tmp_path, image, size, channels):
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    out = load_image(path, channels=channels, size=size)
    assert out.shape == (channels, size, size) and np.isfinite(out).all()
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


@FAST
@given(st.binary(max_size=600), st.sampled_from([".png", ".jpg", ".tif", ".npy", ".dcm", ".nii", ".bmp"]))
def test_any_bytes_either_load_or_fail_with_data_file_error(tmp_path, data, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(data)
    try:
        out = load_image(path)
    except DataFileError as exc:
        assert str(path) in str(exc)
    else:
        assert out.dtype == np.float32 and out.ndim >= 3


@FAST
@given(st.lists(st.text(max_size=30), max_size=4))
def test_param_parsing_gives_a_dict_or_one_clear_error(items):
    try:
        out = parse_params(items)
    except CounterlensError as exc:
        assert "--param" in str(exc)
    else:
        assert all(isinstance(v, dict) for v in out.values())


@FAST
@given(st.text(max_size=20))
def test_number_arguments(text):
    for parse, ok in ((positive_int, lambda v: isinstance(v, int) and v >= 1),
                      (share, lambda v: 0.0 <= v <= 1.0),
                      (batch_size_arg, lambda v: v == "auto" or (isinstance(v, int) and v >= 1))):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as exc:
            assert repr(text) in str(exc)
        else:
            assert ok(value)
    assert all(item and item == item.strip() for item in comma_list(text))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=8)


@FAST
@given(json_values, json_values)
def test_spec_differences_are_empty_exactly_when_equal(a, b):
    diffs = spec_differences(a, b, "x")
    assert (diffs == []) == (a == b)
    assert spec_differences(a, a, "x") == []


@pytest.mark.parametrize("bad", ["", "   ", "-1", "0", "1.5", "1e3", "abc"])
def test_positive_int_examples(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int(bad)
