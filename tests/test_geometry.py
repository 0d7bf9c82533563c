"""instantid.vision.geometry: layouts, output sizes, crops, masks and the keypoint drawing (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instantid.errors import ImageError
from instantid.vision.geometry import draw_keypoints, face_mask, layout, output_size, scale_kps, swap_crop

# --- keypoint image ---------------------------------------------------------------------------------

KPS = np.array([[60, 50], [240, 50], [150, 100], [80, 170], [220, 170]], np.float32)
DIM = 153  # int(255 * 0.6)


@pytest.fixture(scope="module")
def kps_image() -> np.ndarray:
    img = draw_keypoints((300, 220), KPS)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (300, 220)
    return np.asarray(img)


@pytest.mark.parametrize(
    "index,color",
    [(0, (255, 0, 0)), (1, (0, 255, 0)), (2, (0, 0, 255)), (3, (255, 255, 0)), (4, (255, 0, 255))],
)
def test_keypoint_circles(kps_image, index, color):
    x, y = (int(v) for v in KPS[index])
    assert tuple(kps_image[y, x]) == color
    # Filled circle of radius 10: still the full colour 9 px above the point, nothing 12 px above it.
    assert tuple(kps_image[y - 9, x]) == color
    assert tuple(kps_image[y - 12, x]) == (0, 0, 0)


@pytest.mark.parametrize(
    "limb,color",
    [((0, 2), (DIM, 0, 0)), ((1, 2), (0, DIM, 0)), ((3, 2), (DIM, DIM, 0)), ((4, 2), (DIM, 0, DIM))],
)
def test_keypoint_limbs_are_dimmed_in_the_first_points_colour(kps_image, limb, color):
    a, b = KPS[limb[0]], KPS[limb[1]]
    mid = (a + b) / 2
    assert tuple(kps_image[int(mid[1]), int(mid[0])]) == color
    # About 8 px thick (semi-minor axis 4): 2 px off the axis is coloured, 7 px off is background.
    direction = (b - a) / np.linalg.norm(b - a)
    normal = np.array([-direction[1], direction[0]])
    for offset, expected in ((2, color), (-2, color), (7, (0, 0, 0)), (-7, (0, 0, 0))):
        x, y = np.rint(mid + offset * normal).astype(int)
        assert tuple(kps_image[y, x]) == expected, (offset, x, y)


def test_keypoint_background_is_black(kps_image):
    for x, y in ((0, 0), (299, 219), (150, 10), (10, 200), (150, 200)):
        assert tuple(kps_image[y, x]) == (0, 0, 0)
    assert set(np.unique(kps_image.reshape(-1, 3), axis=0).flatten().tolist()) <= {0, DIM, 255}


def test_keypoint_image_tolerates_points_outside():
    kps = KPS.copy()
    kps[0] = (-50, -50)
    kps[4] = (1000, 1000)
    img = draw_keypoints((300, 220), kps)
    assert img.size == (300, 220)


def test_keypoint_image_shape_check():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        draw_keypoints((100, 100), np.zeros((68, 2)))


# --- masks, keypoint scaling, output size -----------------------------------------------------------


def test_face_mask():
    mask = face_mask((100, 50), (10.7, 5.2, 30.9, 20.8))
    assert mask.shape == (50, 100) and mask.dtype == np.float32
    assert mask.sum() == 15 * 20
    assert mask[5:20, 10:30].min() == 1.0
    assert set(np.unique(mask).tolist()) == {0.0, 1.0}


def test_face_mask_clipped():
    assert face_mask((64, 32), (-10, -10, 200, 200)).min() == 1.0
    assert face_mask((64, 32), (100, 100, 200, 200)).sum() == 0
    box = face_mask((100, 100), (40.7, 20.2, 60.9, 30.5))
    assert box.sum() == 20 * 10 and box[20:30, 40:60].min() == 1.0


def test_scale_kps():
    out = scale_kps(KPS, 2.0, 0.5)
    assert out.dtype == np.float32 and out.shape == (5, 2)
    np.testing.assert_allclose(out, KPS * np.array([2.0, 0.5]))
    assert out is not KPS and KPS[0, 0] == 60


@pytest.mark.parametrize(
    "size,kwargs,expected",
    [
        ((512, 768), {}, (832, 1280)),  # 1024 x 1536 -> capped to 853.3 x 1280 -> floored
        ((768, 512), {}, (1280, 832)),
        ((512, 512), {}, (1024, 1024)),
        ((1024, 1024), {}, (1024, 1024)),
        ((3000, 4000), {}, (960, 1280)),  # 1024 x 1365.3 -> 960 x 1280
        ((1920, 1080), {}, (1280, 704)),  # 1820.4 x 1024 -> 1280 x 720 -> 704
        ((100, 1000), {}, (128, 1280)),
        ((10, 10000), {}, (64, 1280)),  # never below one multiple
        ((512, 768), {"max_side": 1024}, (640, 1024)),  # 682.7 x 1024
        ((1000, 1500), {"short_side": 512, "max_side": 512, "multiple": 8}, (336, 512)),
        ((1000, 1100), {}, (1024, 1088)),  # 1024 x 1126.4 -> 1088
    ],
)
def test_output_size(size, kwargs, expected):
    assert output_size(*size, **kwargs) == expected


@pytest.mark.parametrize("args", [(0, 100), (100, -1)])
def test_output_size_rejects(args):
    with pytest.raises(ValueError):
        output_size(*args)


# --- layout and crops ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "out", "box", "expected"),
    [
        # Same aspect: a plain scale, no offset.
        ((512, 768), (1024, 1536), (100, 100, 200, 200), (2.0, 0.0, 0.0)),
        # A wide output of a tall portrait with the face near the top: the crop follows the face...
        ((512, 1024), (1024, 512), (200, 50, 300, 150), (2.0, 0.0, -0.0)),
        # ...and for a face in the middle it is centred on the face.
        ((512, 1024), (1024, 512), (200, 462, 300, 562), (2.0, 0.0, -768.0)),
        # A face at the very bottom: clamped so the canvas stays inside the photo.
        ((512, 1024), (1024, 512), (200, 950, 300, 1024), (2.0, 0.0, -1536.0)),
    ],
)
def test_layout_keeps_the_face_in_frame(src, out, box, expected) -> None:
    assert layout(src, out, box) == pytest.approx(expected)


def test_a_face_cut_by_the_edge_is_refused_not_cropped_outside() -> None:
    # A crop near an edge moves inside the photo; where the photo is smaller than it, it is cut to the photo.
    assert swap_crop((1000, 800), (10, 700, 110, 790)) == (0, 580, 220, 800)
    assert swap_crop((150, 150), (50, 50, 100, 100)) == (20, 20, 130, 130)  # centred on the face
    assert swap_crop((100, 100), (20, 20, 80, 80)) == (0, 0, 100, 100)
    with pytest.raises(ImageError, match="cut by the edge"):
        swap_crop((1000, 800), (-40, 100, 60, 200))


# --- a photo's face on the canvas ------------------------------------------------------------------


class _Face:
    bbox = (100.0, 50.0, 200.0, 170.0)
    kps = np.array([[120, 90], [180, 90], [150, 120], [125, 150], [175, 150]], np.float32)


def test_a_placed_face_and_the_shown_crop_follow_the_layout() -> None:
    from instantid.vision.geometry import face_on_canvas, placed, shown_crop

    image_size, size = (400, 300), (256, 128)
    scale, ox, oy = layout(image_size, size, _Face.bbox)
    kps, box = placed(image_size, _Face, size)
    np.testing.assert_allclose(kps, _Face.kps * scale + np.array([ox, oy]), rtol=1e-6)
    assert box == pytest.approx((100 * scale + ox, 50 * scale + oy, 200 * scale + ox, 170 * scale + oy))
    # The crop of the photo the canvas shows maps back onto the whole canvas.
    x1, y1, x2, y2 = shown_crop((scale, ox, oy), size)
    assert ((x1 * scale + ox, y1 * scale + oy), (x2 * scale + ox, y2 * scale + oy)) == (
        pytest.approx((0, 0)), pytest.approx(size))
    drawing, mask, crop = face_on_canvas(image_size, _Face, size, enhance=True)
    assert drawing.size == size and crop == pytest.approx((x1, y1, x2, y2))
    assert np.array_equal(mask, face_mask(size, box))
    assert face_on_canvas(image_size, _Face, size, enhance=False)[1] is None


def test_a_redrawn_face_is_its_crop_at_working_size() -> None:
    from instantid.vision.geometry import redraw_geometry

    # A photo too low for a square crop: the crop is cut to it, and is scaled unevenly to the working size.
    box, crop_size, size, kps, in_crop, in_work = redraw_geometry(
        (1000, 200), _Face.bbox, _Face.kps, short_side=128, max_side=1280
    )
    assert box == swap_crop((1000, 200), _Face.bbox) and crop_size == (box[2] - box[0], box[3] - box[1])
    assert size == output_size(*crop_size, short_side=128, max_side=1280)
    sx, sy = size[0] / crop_size[0], size[1] / crop_size[1]
    np.testing.assert_allclose(kps, (_Face.kps - np.array(box[:2])) * np.array([sx, sy]), rtol=1e-5)
    assert in_crop == pytest.approx((100 - box[0], 50 - box[1], 200 - box[0], 170 - box[1]))
    assert in_work == pytest.approx((in_crop[0] * sx, in_crop[1] * sy, in_crop[2] * sx, in_crop[3] * sy))
