"""Offline tests of the extra-ControlNet condition makers and their registry, with tiny seeded estimators
written to tmp."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from skimage.data import astronaut

from instantid.errors import CheckpointError, ImageError, InvalidParameter
from instantid.models.controls import (
    COCO_KEYPOINTS,
    CONTROLS,
    ESTIMATOR_FILES,
    OPENPOSE_KEYPOINTS,
    OPENPOSE_LIMBS,
    ConditionFn,
    ControlCode,
    DepthEstimator,
    PoseEstimator,
    canny_condition,
    check_control,
    coco_to_openpose,
    control_registry,
    depth_to_image,
    draw_openpose,
    estimator_writers,
    make_condition,
    openpose_colors,
)
from instantid.models.tiny_controls import save_depth_estimator, save_person_detector, save_pose_estimator
from instantid.settings import CONTROL_TYPES, ControlType

SIZES = [(128, 128), (300, 200)]


@pytest.fixture(scope="module")
def photo() -> PIL.Image.Image:
    return PIL.Image.fromarray(astronaut())


@pytest.fixture(scope="module")
def estimator_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every estimator checkpoint the registry writes, tiny, by its `Settings` field."""
    root = tmp_path_factory.mktemp("tiny_controls")
    for field_name, write in estimator_writers().items():
        write(root / field_name)
    return {field_name: root / field_name for field_name in estimator_writers()}


@pytest.fixture(scope="module")
def tiny_folders(estimator_folders: dict[str, Path]) -> dict[str, Path]:
    return {
        "depth": estimator_folders["depth_estimator"],
        "pose": estimator_folders["pose_estimator"],
        "detector": estimator_folders["person_detector"],
    }


def _black(a: np.ndarray) -> np.ndarray:
    return (a == 0).all(axis=-1)


# --- canny ---------------------------------------------------------------------------------------------


def test_canny_on_astronaut_keeps_size_and_finds_edges(photo: PIL.Image.Image) -> None:
    out = canny_condition(photo)
    assert out.mode == "RGB" and out.size == photo.size
    a = np.asarray(out)
    assert set(np.unique(a)) <= {0, 255}
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    edge_fraction = float((a[..., 0] == 255).mean())
    assert 0.01 < edge_fraction < 0.5
    # Higher thresholds keep fewer edges.
    assert (np.asarray(canny_condition(photo, 200, 400))[..., 0] == 255).mean() < edge_fraction


def test_canny_accepts_other_modes_and_rejects_bad_thresholds(photo: PIL.Image.Image) -> None:
    rgba = photo.convert("RGBA").resize((64, 48))
    assert canny_condition(rgba).size == (64, 48)
    with pytest.raises(InvalidParameter, match="canny_high"):
        canny_condition(photo, low=200, high=100)
    with pytest.raises(InvalidParameter, match="canny_low"):
        canny_condition(photo, low=-1)


# --- depth ---------------------------------------------------------------------------------------------


def test_depth_to_image_makes_near_bright() -> None:
    disparity = np.array([[0.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    a = np.asarray(depth_to_image(disparity))
    assert a.shape == (2, 2, 3) and a.dtype == np.uint8
    assert a[0, 0, 0] == 0 and a[1, 1, 0] == 255 and a[1, 0, 0] == 128
    # Metric depth is distance: the nearest (smallest) value must come out brightest.
    b = np.asarray(depth_to_image(disparity, near_is_large=False))
    assert b[0, 0, 0] == 255 and b[1, 1, 0] == 0
    assert not np.asarray(depth_to_image(np.full((3, 4), 7.0))).any()


@pytest.mark.parametrize("size", SIZES)
def test_tiny_depth_estimator_output(
    tiny_folders: dict[str, Path], photo: PIL.Image.Image, size: tuple[int, int]
) -> None:
    estimator = DepthEstimator.from_folders(tiny_folders["depth"])
    image = photo.resize(size)
    first = estimator(image)
    out = estimator(image)
    assert out.mode == "RGB" and out.size == size
    a = np.asarray(out)
    assert a.min() == 0 and a.max() == 255
    assert (a[..., 0] == a[..., 2]).all()
    assert np.array_equal(a, np.asarray(first))  # eval mode, no randomness


def test_tiny_estimator_folders_are_small_and_complete(estimator_folders: dict[str, Path]) -> None:
    for folder in estimator_folders.values():
        names = {p.name for p in folder.iterdir()}
        assert set(ESTIMATOR_FILES) <= names, folder
        assert sum(p.stat().st_size for p in folder.iterdir()) < 400_000, folder


def test_loading_from_a_folder_without_a_checkpoint_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="depth estimator"):
        DepthEstimator.from_folders(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pose estimator"):
        PoseEstimator.from_folders(tmp_path, None)


# --- pose: format --------------------------------------------------------------------------------------


def test_openpose_palette_and_limbs() -> None:
    colors = openpose_colors()
    assert len(colors) == 18 and len(set(colors)) == 18
    assert colors[0] == (255, 0, 0) and colors[1] == (255, 85, 0) and colors[6] == (0, 255, 0)
    assert colors[12] == (0, 0, 255) and colors[17] == (255, 0, 85)
    assert len(OPENPOSE_LIMBS) == 17
    assert all(0 <= a < 18 and 0 <= b < 18 for a, b in OPENPOSE_LIMBS)


def _standing_person() -> np.ndarray:
    """COCO-17 keypoints of a front-facing person on a 512x512 canvas (its right side on the image left)."""
    points = {
        "nose": (256, 100), "left_eye": (266, 90), "right_eye": (246, 90), "left_ear": (278, 96),
        "right_ear": (234, 96), "left_shoulder": (300, 160), "right_shoulder": (212, 160),
        "left_elbow": (330, 240), "right_elbow": (182, 240), "left_wrist": (340, 310), "right_wrist": (172, 310),
        "left_hip": (285, 300), "right_hip": (227, 300), "left_knee": (290, 390), "right_knee": (222, 390),
        "left_ankle": (292, 470), "right_ankle": (220, 470),
    }  # fmt: skip
    return np.array([[*points[name], 0.9] for name in COCO_KEYPOINTS], dtype=np.float32)


def test_coco_to_openpose_order_and_neck() -> None:
    coco = _standing_person()
    coco[COCO_KEYPOINTS.index("left_shoulder"), 2] = 0.8
    coco[COCO_KEYPOINTS.index("right_shoulder"), 2] = 0.4
    op = coco_to_openpose(coco)
    assert op.shape == (18, 3)
    neck = OPENPOSE_KEYPOINTS.index("neck")
    assert neck == 1
    np.testing.assert_allclose(op[neck, :2], [256.0, 160.0])
    assert op[neck, 2] == pytest.approx(0.4)  # only as sure as the weaker shoulder
    for j, name in enumerate(OPENPOSE_KEYPOINTS):
        if name != "neck":
            np.testing.assert_array_equal(op[j], coco[COCO_KEYPOINTS.index(name)])
    # Spot-check OpenPose's own order.
    assert OPENPOSE_KEYPOINTS[2] == "right_shoulder" and OPENPOSE_KEYPOINTS[5] == "left_shoulder"
    np.testing.assert_allclose(op[2, :2], [212.0, 160.0])
    np.testing.assert_allclose(op[17, :2], [278.0, 96.0])  # left ear last
    with pytest.raises(ValueError, match="17, 3"):
        coco_to_openpose(np.zeros((18, 3)))


def test_draw_openpose_pixels() -> None:
    colors = openpose_colors()
    person = coco_to_openpose(_standing_person())
    a = np.asarray(draw_openpose([person], (512, 512)))
    assert a.shape == (512, 512, 3)
    # Joints sit on top in full colour: nose red, neck orange, left ankle (OpenPose 13) blue.
    assert tuple(a[100, 256]) == colors[0]
    assert tuple(a[160, 256]) == colors[1]
    assert tuple(a[470, 292]) == colors[13]
    # Limb 0 (neck -> right shoulder) at 60% of colour 0, half-way along the bone.
    assert tuple(a[160, 234]) == (153, 0, 0)
    # Limb 7 (right hip -> right knee) at 60% of colour 7.
    assert tuple(a[345, 224]) == tuple(int(c * 0.6) for c in colors[7])
    # Background stays black.
    assert _black(a)[:60].all() and _black(a)[480:].all() and _black(a)[:, :150].all()
    assert _black(a).mean() > 0.9


def test_draw_openpose_hides_unsure_parts() -> None:
    person = coco_to_openpose(_standing_person())
    person[OPENPOSE_KEYPOINTS.index("left_knee"), 2] = 0.1
    a = np.asarray(draw_openpose([person], (512, 512), threshold=0.3))
    assert _black(a)[390, 290]  # the knee itself
    assert _black(a)[345, 287] and _black(a)[430, 291]  # both bones through it
    # Nothing at all when every score is low; a second person is drawn too.
    assert not np.asarray(draw_openpose([person * [1, 1, 0]], (512, 512))).any()
    shifted = person.copy()
    shifted[:, 0] -= 100
    two = np.asarray(draw_openpose([person, shifted], (512, 512)))
    assert tuple(two[100, 156]) == openpose_colors()[0]


# --- pose: tiny models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_tiny_pose_estimator_output(
    tiny_folders: dict[str, Path], photo: PIL.Image.Image, size: tuple[int, int]
) -> None:
    estimator = PoseEstimator.from_folders(tiny_folders["pose"], tiny_folders["detector"])
    image = photo.resize(size)
    out = estimator(image)
    assert out.mode == "RGB" and out.size == size
    for person in estimator.keypoints(image):
        assert person.shape == (17, 3)


def test_tiny_pose_draws_skeletons_on_black(tiny_folders: dict[str, Path], photo: PIL.Image.Image) -> None:
    # Random weights score low, so accept every box and keypoint to drive detection and drawing.
    estimator = PoseEstimator.from_folders(
        tiny_folders["pose"], tiny_folders["detector"], detection_threshold=0.0, keypoint_threshold=0.0
    )
    image = photo.resize((300, 200))
    boxes = estimator.detect_people(image)
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and 1 <= len(boxes) <= estimator.max_people
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    a = np.asarray(estimator(image))
    black = _black(a)
    assert 0.5 < black.mean() < 1.0  # something drawn, mostly background
    assert set(np.unique(a[black])) == {0}


def test_pose_falls_back_to_whole_image(tiny_folders: dict[str, Path], photo: PIL.Image.Image) -> None:
    image = photo.resize((300, 200))
    nobody = PoseEstimator.from_folders(tiny_folders["pose"], tiny_folders["detector"], detection_threshold=1.01)
    np.testing.assert_array_equal(nobody.detect_people(image), [[0, 0, 300, 200]])
    no_detector = PoseEstimator.from_folders(tiny_folders["pose"], None)
    np.testing.assert_array_equal(no_detector.detect_people(image), [[0, 0, 300, 200]])
    assert len(no_detector.keypoints(image)) == 1
    assert no_detector(image).size == (300, 200)
    assert list(no_detector.modules()) == ["pose_model"]  # the memory report lists what is there


# --- dispatch ------------------------------------------------------------------------------------------


class _LazyEstimators(Mapping[str, ConditionFn]):
    """Loads an estimator only when its key is read, as the engine's holder may."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __getitem__(self, key: str) -> ConditionFn:
        if key not in ("pose", "depth"):
            raise KeyError(key)
        self.loaded.append(key)
        return lambda image: PIL.Image.new("RGB", image.size, (1, 2, 3) if key == "pose" else (4, 5, 6))

    def __iter__(self) -> Iterator[str]:
        return iter(("pose", "depth"))

    def __len__(self) -> int:
        return 2


def test_make_condition_dispatch(photo: PIL.Image.Image) -> None:
    small = photo.resize((64, 64))
    lazy = _LazyEstimators()
    assert np.array_equal(np.asarray(make_condition("canny", small, lazy)), np.asarray(canny_condition(small)))
    assert lazy.loaded == []  # canny needs no model
    assert make_condition("depth", small, lazy).getpixel((0, 0)) == (4, 5, 6)
    assert set(lazy.loaded) == {"depth"}
    assert make_condition("pose", small.convert("L"), lazy).getpixel((5, 5)) == (1, 2, 3)
    with pytest.raises(InvalidParameter, match="controlnet"):
        make_condition("openpose", small, lazy)
    with pytest.raises(LookupError, match="depth"):
        make_condition("depth", small, {})
    with pytest.raises(ImageError):
        make_condition("canny", np.zeros((8, 8, 3), dtype=np.uint8), {})  # type: ignore[arg-type]


def test_make_condition_with_tiny_estimators(tiny_folders: dict[str, Path], photo: PIL.Image.Image) -> None:
    estimators: dict[str, ConditionFn] = {
        "depth": DepthEstimator.from_folders(tiny_folders["depth"]),
        "pose": PoseEstimator.from_folders(tiny_folders["pose"], tiny_folders["detector"]),
    }
    image = photo.resize((128, 96))
    for name in ("pose", "canny", "depth"):
        out = make_condition(name, image, estimators)
        assert out.size == (128, 96) and out.mode == "RGB"


# --- the registry --------------------------------------------------------------------------------------


def test_every_control_type_has_working_code(estimator_folders: dict[str, Path], photo: PIL.Image.Image) -> None:
    """Each declared control type's record, used as the engine and the tiny preset use it: its writers make
    the checkpoints its estimator loads (from its fields' folders, in order), and it makes a condition image."""
    import torch

    assert list(CONTROLS) == list(CONTROL_TYPES)
    image = photo.resize((96, 64))
    for name, kind in CONTROL_TYPES.items():
        code = CONTROLS[name]
        check_control(kind, code)
        if kind.has_estimator:
            assert code.estimator is not None and code.condition is None
            estimator = code.estimator.from_folders(*(estimator_folders[f] for f in kind.estimator_fields))
            modules = estimator.modules()
            assert modules and all(isinstance(m, torch.nn.Module) for m in modules.values()), name
            out = make_condition(name, image, {name: estimator})
        else:
            assert code.estimator is None and code.writers == {}
            out = make_condition(name, image, {})
        assert out.mode == "RGB" and out.size == (96, 64), name


def test_the_writers_are_the_registrys_own() -> None:
    """The tiny preset and the benchmarks write exactly the checkpoints the control types declare."""
    fields = [f for kind in CONTROL_TYPES.values() for f in kind.estimator_fields]
    assert list(estimator_writers()) == fields
    assert estimator_writers()["depth_estimator"] is save_depth_estimator
    assert {save_pose_estimator, save_person_detector} == set(CONTROLS["pose"].writers.values())


class _NoModules:
    """An estimator class that cannot say what it holds."""

    @classmethod
    def from_folders(cls, path: Path, device: str = "cpu") -> _NoModules:
        return cls()

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        return image


def _write_nothing(folder: Path) -> None:  # no released_shape
    pass


_DEPTH = {"depth_estimator": save_depth_estimator}
_BROKEN = {
    "no writer": ("depth", ControlCode("depth", estimator=DepthEstimator), "writers"),
    "a writer too many": (
        "depth", ControlCode("depth", estimator=DepthEstimator, writers={**_DEPTH, "extra": save_depth_estimator}),
        "writers",
    ),
    "one of two writers": (
        "pose", ControlCode("pose", estimator=PoseEstimator, writers={"pose_estimator": save_pose_estimator}), "writers"
    ),
    "a writer without released_shape": (
        "depth", ControlCode("depth", estimator=DepthEstimator, writers={"depth_estimator": _write_nothing}),
        "released_shape",
    ),
    "no estimator": ("depth", ControlCode("depth", writers=_DEPTH), "estimator class"),
    "a condition where an estimator goes": (
        "depth", ControlCode("depth", condition=canny_condition, estimator=DepthEstimator, writers=_DEPTH), "estimator",
    ),
    "an estimator without modules": (
        "depth", ControlCode("depth", estimator=_NoModules, writers=_DEPTH), "without modules",  # type: ignore[arg-type]
    ),
    "an estimator taking too few folders": (
        "pose", ControlCode("pose", estimator=DepthEstimator, writers=dict(CONTROLS["pose"].writers)), "estimator",
    ),
    "no condition maker": ("canny", ControlCode("canny"), "condition maker"),
    "an estimator without fields": ("canny", ControlCode("canny", estimator=DepthEstimator), "condition maker"),
    "a condition maker taking no image": ("canny", ControlCode("canny", condition=lambda: None), "condition maker"),  # type: ignore[arg-type]
    "another type's record": ("canny", ControlCode("depth", condition=canny_condition), "named 'depth'"),
}


@pytest.mark.parametrize("case", list(_BROKEN))
def test_a_record_missing_a_piece_fails(case: str) -> None:
    name, code, message = _BROKEN[case]
    with pytest.raises(TypeError, match=message):
        check_control(CONTROL_TYPES[name], code)


def test_the_registry_matches_the_declarations() -> None:
    codes = list(CONTROLS.values())
    assert control_registry(CONTROL_TYPES, codes) == CONTROLS
    with pytest.raises(TypeError, match="exactly one ControlCode"):
        control_registry(CONTROL_TYPES, codes[:-1])  # a declared type without code
    with pytest.raises(TypeError, match="exactly one ControlCode"):
        control_registry(CONTROL_TYPES, [*codes, codes[0]])  # two records for one type
    with pytest.raises(TypeError, match="exactly one ControlCode"):
        control_registry({n: k for n, k in CONTROL_TYPES.items() if n != "canny"}, codes)  # code for no type
    # A declared estimator checkpoint needs its Settings field (and so its INSTANTID_<FIELD> variable).
    lineart = ControlType("lineart", "Lineart", "me/lineart", ("lineart_estimator",))
    code = ControlCode("lineart", estimator=DepthEstimator, writers={"lineart_estimator": save_depth_estimator})
    with pytest.raises(TypeError, match="Settings lacks: lineart_estimator"):
        check_control(lineart, code)
