"""Control-image preprocessors (`sdrt.control_preprocess`): canny through OpenCV, names and parameters checked."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from sdrt.control_preprocess import canny, check_preprocessor, preprocess
from sdrt.errors import InvalidInputError


def square_picture() -> PIL.Image.Image:
    """A white square on a dark red ground: its only edges are the square's outline."""
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[..., 0] = 60
    arr[8:24, 8:24] = 255
    return PIL.Image.fromarray(arr)


def test_canny_is_opencvs_edge_map_on_three_channels():
    import cv2

    picture = square_picture()
    edges = canny(picture)
    assert edges.mode == "RGB" and edges.size == picture.size
    arr = np.asarray(edges)
    assert np.array_equal(arr[..., 0], cv2.Canny(np.asarray(picture), 100, 200))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    assert set(np.unique(arr)) == {0, 255}
    on = np.argwhere(arr[..., 0] > 0)
    # every edge pixel lies on the square's border (within a pixel), and the border is found
    assert on.min() >= 7 and on.max() <= 24 and len(on) >= 4 * 14
    inside = arr[10:22, 10:22, 0]
    assert not inside.any()


def test_thresholds_and_input_forms():
    picture = square_picture()
    arr = np.asarray(picture)
    assert np.array_equal(np.asarray(preprocess("canny:100:200", picture)), np.asarray(canny(picture)))
    assert np.array_equal(np.asarray(preprocess("canny", arr)), np.asarray(canny(picture)))  # a uint8 array
    # thresholds above every gradient find nothing
    assert not np.asarray(preprocess("canny:5000:6000", picture)).any()


@pytest.mark.parametrize("spec,match", [
    ("sobel", r"unknown control preprocessor 'sobel'; choose one of canny"),
    ("canny:1", r"give canny or canny:N:N with 2 non-negative integers"),
    ("canny:a:b", r"give canny or canny:N:N with 2 non-negative integers"),
    ("canny:200:100", r"canny needs LOW <= HIGH"),
    (3, r"control_preprocess must be a preprocessor name \(canny\), got 3"),
])
def test_bad_names_are_refused(spec, match):
    with pytest.raises(InvalidInputError, match=match):
        check_preprocessor(spec)
