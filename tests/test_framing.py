"""Framing and head angle: the face placed and turned without a pose photo.

The geometry alone (a turned face fits back to its angle, left mirrors right, front puts the nose between level
eyes, the canvases), the prepare stage on real photos with the real face detector (the drawn keypoints at the
declared shares, full body refined by default, a pose or layout photo overriding with a warning, the defaults laid
out as before), and the doors: the request's refusals, the API and MCP as their clients call them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from instantid.declaration import PARAMS
from instantid.errors import InvalidParameter, UserError
from instantid.models.loading import load_face_analyzer
from instantid.models.memory import PROFILES
from instantid.request.prepare import prepare
from instantid.request.requests import Job, Request
from instantid.request.scenes import Workshop
from instantid.vision import framing, geometry
from instantid.vision.images import image_to_array


def load_image(path: str):
    """A test photo as the decoder gives it (with its warnings), within generous limits."""
    from instantid.vision.images import load_image as decode

    return decode(path, max_bytes=50 * 2**20, max_pixels=50_000_000)


SIDES = {name: framing.canvas_size(name, 1024, 1280) for name in ("portrait", "half body", "full body")}
ANGLES = ("photo", "front", "left", "right", "up", "down")


# --- the geometry ----------------------------------------------------------------------------------------------


def _canonical() -> tuple[np.ndarray, tuple[float, float, float, float]]:
    return framing.CANONICAL_FACE[:, :2].astype(np.float32), framing.CANONICAL_BOX


@pytest.mark.parametrize(("yaw", "pitch"), [(0, 0), (30, 0), (-30, 0), (0, 20), (0, -20), (45, 30), (-45, -30),
                                            (20, -10)])
def test_a_turned_face_fits_back_to_its_angle(yaw: float, pitch: float) -> None:
    kps, box = framing.turned(*_canonical(), yaw, pitch)
    fitted = framing.angles(framing.photo_pose(kps)[1])
    assert abs(fitted[0] - yaw) < 0.5 and abs(fitted[1] - pitch) < 0.5 and abs(fitted[2]) < 0.5, fitted


def _mirrored(kps: np.ndarray, axis: float) -> np.ndarray:
    """`kps` mirrored about the vertical line x = `axis`, left and right features swapping names."""
    out = np.asarray(kps, dtype=np.float64)[list(framing.MIRRORED)].copy()
    out[:, 0] = 2 * axis - out[:, 0]
    return out


@pytest.fixture(scope="module")
def analyzer(tiny_settings):
    return load_face_analyzer(tiny_settings)


@pytest.fixture(scope="module")
def faces(analyzer, photos) -> list:
    """Real faces: the astronaut, her mirror image and t1.jpg's six (some tilted, some turned)."""
    found = []
    for name in ("astronaut", "astronaut_flipped", "group"):
        found += analyzer.detect(image_to_array(load_image(str(photos[name]))[0]), with_embedding=False)
    assert len(found) == 8
    return found


def test_left_and_right_mirror_each_other_about_the_face_axis(faces) -> None:
    for face in faces:
        for left, right in (("left", "right"), ((-20.0, 10.0), (20.0, 10.0))):
            lk, lbox = framing.turned(face.kps, face.bbox, *(framing.HEAD_ANGLES.get(left) or left))
            rk, rbox = framing.turned(face.kps, face.bbox, *(framing.HEAD_ANGLES.get(right) or right))
            axis = (face.bbox[0] + face.bbox[2]) / 2
            assert np.allclose(_mirrored(lk, axis), rk, atol=1e-3), (lk, rk)
            assert np.allclose(lbox, rbox, atol=1e-3)
        # Turned towards the picture's left, the nose lies left of the eyes' middle; the far eye comes closer.
        lk, _ = framing.turned(face.kps, face.bbox, *framing.HEAD_ANGLES["left"])
        assert lk[2, 0] < (lk[0, 0] + lk[1, 0]) / 2


def test_front_puts_the_nose_between_level_eyes(faces) -> None:
    for face in faces:
        kps, box = framing.turned(face.kps, face.bbox, 0.0, 0.0)
        assert abs(kps[2, 0] - (kps[0, 0] + kps[1, 0]) / 2) < 1e-3
        assert abs(framing.eye_angle(kps)) < 1e-3 and kps[2, 1] > kps[0, 1] and kps[3, 1] > kps[2, 1]
        # The box keeps the photo box's height and place: only the angle changes.
        assert np.allclose([box[1], box[3]], [face.bbox[1], face.bbox[3]], atol=1e-3)
        up, _ = framing.turned(face.kps, face.bbox, *framing.HEAD_ANGLES["up"])
        down, _ = framing.turned(face.kps, face.bbox, *framing.HEAD_ANGLES["down"])
        # The nose tip stands in front of the face: raised, it comes nearer the eyes; lowered, nearer the mouth.
        assert up[2, 1] - up[0, 1] < kps[2, 1] - kps[0, 1] < down[2, 1] - down[0, 1]


def test_canvases_are_sdxl_sizes_in_portrait_orientation() -> None:
    assert SIDES == {"portrait": (1024, 1024), "half body": (896, 1152), "full body": (832, 1216)}
    assert framing.canvas_size("photo", 1024, 1280) is None
    for short in (512, 128):
        for name in ("half body", "full body"):
            width, height = framing.canvas_size(name, short, 1280)
            assert height > width and width % 64 == 0 and height % 64 == 0, (short, name)
    assert framing.canvas_size("full body", 1024, 1024) == (832, 1024)  # a server's size cap holds


# --- the prepare stage, on real photos --------------------------------------------------------------------


@pytest.fixture(scope="module")
def workshop(tiny_settings, analyzer) -> Workshop:
    return Workshop(tiny_settings, PROFILES["cpu"], lambda: analyzer)


def _job(workshop: Workshop, **fields) -> Job:
    return prepare(Request(seed=1, **fields), workshop, time.time())


def drawn_points(keypoint_image) -> np.ndarray:
    """The five keypoints as drawn: the centroid of each point's circle (its pure colour; the limbs are dimmed)."""
    pixels = np.asarray(keypoint_image.convert("RGB"))
    points = []
    for colour in geometry.KPS_COLORS:
        ys, xs = np.nonzero(np.all(pixels == colour, axis=-1))
        assert len(xs), colour
        points.append((xs.mean(), ys.mean()))
    return np.array(points)


def eyes_to_mouth(kps: np.ndarray) -> float:
    return float((kps[3, 1] + kps[4, 1]) / 2 - (kps[0, 1] + kps[1, 1]) / 2)


@pytest.mark.parametrize("name", list(SIDES))
def test_each_framing_draws_the_face_at_its_declared_share(workshop, faces, photos, name: str) -> None:
    """Measured on the drawn image: the eyes' line and the face box's height (the drawn eyes-to-mouth span over
    the face's own share of its box), within 10 % of the framing's declared shares, for every named angle."""
    spec, (width, height) = framing.FRAMINGS[name], SIDES[name]
    face = faces[0]  # the astronaut's
    for angle in ANGLES:
        job = _job(workshop, face_images=[str(photos["astronaut"])], framing=name, head_angle=angle, width=width,
                   height=height)
        points = drawn_points(job.keypoint_image)
        asked = framing.HEAD_ANGLES[angle]
        kps, box = (face.kps, face.bbox) if asked is None else framing.turned(face.kps, face.bbox, *asked)
        own = eyes_to_mouth(np.asarray(kps)) / (box[3] - box[1])
        share = eyes_to_mouth(points) / own / height
        eyes = (points[0, 1] + points[1, 1]) / 2 / height
        assert abs(share / spec.face_share - 1) < 0.1, (angle, share)
        assert abs(eyes / spec.eye_line - 1) < 0.1, (angle, eyes)
        assert abs((points[0, 0] + points[1, 0]) / 2 / width - 0.5) < 0.1  # centred
        if asked is not None:
            assert abs(framing.eye_angle(points)) < 2.0  # upright, whatever the photo's roll


def test_without_a_size_the_framing_picks_a_portrait_canvas(workshop, photos) -> None:
    short = workshop.working_short_side()
    for name in SIDES:
        job = _job(workshop, face_images=[str(photos["group"])], framing=name)
        assert (job.width, job.height) == framing.canvas_size(name, short, workshop.settings.max_output_side)


def test_photo_framing_and_angle_lay_out_the_photo_as_it_is(workshop, analyzer, photos) -> None:
    """The defaults take the path they always took (the images were hash-identical before and after framing came):
    the photo's face where the photo has it, nothing turned; a group side by side as before."""
    job = _job(workshop, face_images=[str(photos["hanks"])])
    image = load_image(str(photos["hanks"]))[0]
    face, _ = analyzer.embed_largest(image_to_array(image))  # as prepare finds it
    expected, _, _ = geometry.face_on_canvas(image.size, face, (job.width, job.height), enhance=True)
    assert np.array_equal(np.asarray(job.keypoint_image), np.asarray(expected))
    assert job.refine == [] and not any("ignored" in w for w in job.warnings)
    # The photo's place and size with only the angle changed: the same canvas, the face box in the same place.
    turned = _job(workshop, face_images=[str(photos["hanks"])], head_angle="front")
    assert (turned.width, turned.height) == (job.width, job.height)
    assert not np.array_equal(np.asarray(turned.keypoint_image), np.asarray(job.keypoint_image))
    group = _job(workshop, mode="group", people=[[str(photos["astronaut"])], [str(photos["hanks"])]])
    faces = [analyzer.embed_largest(image_to_array(load_image(str(photos[n]))[0]))[0] for n in ("astronaut", "hanks")]
    spots = geometry.group_layout((group.width, group.height), faces)
    for person, (kps, _) in zip(group.group, spots, strict=True):
        assert np.array_equal(np.asarray(person.keypoint_image),
                              np.asarray(geometry.draw_keypoints((group.width, group.height), kps)))


def test_full_body_refines_its_face_by_default(workshop, photos) -> None:
    face = [str(photos["astronaut"])]
    full = _job(workshop, face_images=face, framing="full body")
    assert [plan.label for plan in full.refine] == ["the face"]
    assert _job(workshop, face_images=face, framing="full body", refine_faces="off").refine == []
    # A portrait's face is large: auto leaves it as drawn.
    assert _job(workshop, face_images=face, framing="portrait").refine == []
    # A group's framing sets each face's size side by side: full body makes both small, so both are refined.
    group = _job(workshop, mode="group", people=[face, [str(photos["hanks"])]], framing="full body", names="Ada, Ben")
    assert [plan.label for plan in group.refine] == ["Ada", "Ben"]
    # At a size where every drawn point stands apart: full body's faces a framing's share of the height apart.
    people, size = [face, [str(photos["hanks"])]], {"width": 1536, "height": 1024, "refine_faces": "off"}
    spans = {name: [eyes_to_mouth(drawn_points(p.keypoint_image))
                    for p in _job(workshop, mode="group", people=people, framing=name, **size).group]
             for name in ("portrait", "full body")}
    ratio = framing.FRAMINGS["full body"].face_share / framing.FRAMINGS["portrait"].face_share
    for full, portrait in zip(spans["full body"], spans["portrait"], strict=True):
        assert abs(full / portrait / ratio - 1) < 0.1, spans


def test_a_pose_or_layout_photo_overrides_framing_with_a_warning(workshop, photos) -> None:
    face, pose = [str(photos["astronaut"])], str(photos["hanks"])
    plain = _job(workshop, face_images=face, pose_image=pose)
    framed = _job(workshop, face_images=face, pose_image=pose, framing="full body", head_angle="left")
    assert np.array_equal(np.asarray(framed.keypoint_image), np.asarray(plain.keypoint_image))
    assert (framed.width, framed.height, framed.refine) == (plain.width, plain.height, [])
    assert "Framing and head angle ignored: the pose photo sets the face's place, size and angle; leave it empty " \
           "to use them." in framed.warnings
    layout = _job(workshop, mode="group", people=[face, [pose]], layout_image=str(photos["group"]), head_yaw=20,
                  refine_faces="off")
    assert any(w.startswith("Head angle ignored: the layout photo sets") for w in layout.warnings), layout.warnings


# --- the doors -----------------------------------------------------------------------------------------------

BAD = [
    ({"framing": "close-up"}, "Invalid framing='close-up': choose one of photo, portrait, half body, full body."),
    ({"head_angle": "sideways"}, "Invalid head_angle='sideways': choose one of photo, front, left, right, up, down."),
    ({"head_yaw": 60}, "Invalid head_yaw=60: must be a number in -45..45."),
    ({"head_pitch": -31.5}, "Invalid head_pitch=-31.5: must be a number in -30..30."),
    ({"head_angle": "left", "head_yaw": 10}, "Invalid head_angle='left': give either head_angle or "
                                             "head_yaw/head_pitch, not both."),
    ({"framing": "portrait", "controlnets": {"canny": 0.4}}, "Invalid controlnets='canny': must come from a photo's "
     "layout, which framing and head angle replace: add a pose photo (it then sets the layout), set framing and head "
     "angle to photo, or leave the extra ControlNets out."),
]


@pytest.mark.parametrize(("values", "sentence"), BAD)
def test_a_bad_value_is_refused_in_one_sentence(values: dict, sentence: str) -> None:
    with pytest.raises(UserError) as caught:
        Request.from_api({"face_image": "face.png", **values})
    assert str(caught.value) == sentence


def test_restyle_and_swap_keep_their_photos_layouts() -> None:
    for mode, photo in (("restyle", "source_image"), ("swap", "target_image")):
        assert mode not in PARAMS["framing"].modes and mode not in PARAMS["head_angle"].modes
        with pytest.raises(InvalidParameter, match=f"is not used by {mode}"):
            Request(mode=mode, face_images=["f.png"], framing="full body", **{photo: "p.png"})


@pytest.mark.slow
def test_the_api_and_mcp_take_framing_as_their_clients_send_it(tiny_app, photos) -> None:
    """gradio_client: full body comes back refined, said in the caption; a bad value is the request's sentence.
    The official MCP client: the same refusal as an isError result, and a framed generation with its images."""
    from tests.test_mcp import FAST, data_url, images_of, in_session, texts_of

    client = Client(tiny_app.url, verbose=False)
    gallery, *_ = client.predict(handle_file(str(photos["astronaut"])), "a hiker", framing="full body",
                                        head_angle="right", num_steps=2, seed=4, api_name="/generate")
    assert "refined: the face" in gallery[0]["caption"], gallery
    assert Image.open(gallery[0]["image"]).size == framing.canvas_size("full body", 128, 1280)  # tiny preset
    with pytest.raises(AppError) as caught:
        client.predict(handle_file(str(photos["astronaut"])), "x", framing="close-up", api_name="/generate")
    assert str(caught.value) == BAD[0][1]

    async def work(session):
        face = data_url(Path(photos["astronaut"]))
        return [await session.call_tool("generate", {"face_image": face, "prompt": "x", "head_yaw": 99}),
                await session.call_tool("generate", {"face_image": face, "prompt": "x", "framing": "half body",
                                                     "head_angle": "up", **FAST})]

    refused, framed = in_session(tiny_app, "sse", work)
    assert refused.isError and texts_of(refused) == ["Invalid head_yaw=99: must be a number in -45..45."]
    assert not framed.isError, texts_of(framed)
    image, keypoints = images_of(framed)  # the image and its face layout, half body's portrait canvas
    assert image.size == keypoints.size == framing.canvas_size("half body", 128, 1280)


@pytest.mark.parametrize("mode", ["generate", "group"])
def test_the_page_prices_a_framing_as_the_call_will_ask(tiny_settings, analyzer, photos, mode: str) -> None:
    """The GPU seconds shown before the click (`api._settings_shape`) are those the prepared job asks for: the
    framing's canvas and, for full body, its refined face(s), on ZeroGPU's profile; and the layout preview
    (`hints.layout_preview`) names that canvas."""
    import dataclasses

    from instantid.frontends import api, hints
    from instantid.request import durations

    workshop = Workshop(dataclasses.replace(tiny_settings, preset="real"), PROFILES["zerogpu"], lambda: analyzer)
    face, other = str(photos["astronaut"]), str(photos["hanks"])
    people = {"people": [[face], [other]]} if mode == "group" else {"face_images": [face]}
    slots = {"person_1": [face], "person_2": [other]} if mode == "group" else {}
    refined = {}
    for name in ("portrait", "half body", "full body"):
        job = prepare(Request(mode=mode, framing=name, seed=1, **people), workshop, time.time())
        page, _ = api._settings_shape(mode, {"framing": name, **slots}, PROFILES["zerogpu"], 1024)
        assert page == durations.shape_of(job), name
        _, _, caption = hints.layout_preview(mode, {"framing": name, **slots}, 1024, workshop.settings.max_output_side)
        assert f"{job.width}x{job.height})" in caption, (name, caption)
        refined[name] = len(job.refine)
    assert refined == ({"portrait": 0, "half body": 0, "full body": 1} if mode == "generate" else
                       {"portrait": 0, "half body": 2, "full body": 2})


def test_the_framing_words_lead_the_prompt_unless_it_names_the_framing(workshop, photos) -> None:
    face = [str(photos["astronaut"])]
    full = _job(workshop, face_images=face, prompt="a hiker", framing="full body")
    assert (full.prompt, full.refine_prompt) == ("full body shot, a hiker", "a hiker")
    assert "Framing full body: 'full body shot' put before the prompt; name the framing in your prompt to word it " \
           "yourself." in full.warnings
    named = _job(workshop, face_images=face, prompt="Full-body photo of a hiker", framing="full body")
    assert (named.prompt, named.refine_prompt) == ("Full-body photo of a hiker", "")
    empty = _job(workshop, face_images=face, framing="half body", refine_faces="on")
    assert empty.prompt == "half body shot of a person, high quality, detailed face"
    assert empty.refine_prompt == "a portrait photo of a person, high quality, detailed face"
    assert _job(workshop, face_images=face, prompt="a knight", framing="portrait").prompt.startswith(
        "head and shoulders portrait, a knight")
    # Only a framing adds words: the photo's own, or a pose photo's, leaves the prompt as written.
    for extra in ({"head_angle": "left"}, {"framing": "full body", "pose_image": str(photos["hanks"])}):
        job = _job(workshop, face_images=face, prompt="a knight", **extra)
        assert (job.prompt, job.refine_prompt) == ("a knight", "")


def test_a_refined_face_is_drawn_without_the_framing_words(tiny_engine, photos) -> None:
    """The image's pass has the framing's words; the refined face's pass, in a crop around the face, has not.
    The real tiny pipelines run; the wrapper only records the prompt each pass is given."""
    from instantid.request.render import run_pipeline

    job = tiny_engine.prepare(Request(face_images=[str(photos["astronaut"])], prompt="a hiker", framing="full body",
                                      num_steps=2, seed=1))
    assert len(job.refine) == 1
    prompts: list[str] = []

    class Recorded:
        def __init__(self, pipe) -> None:
            self.pipe = pipe

        def __getattr__(self, name: str):
            return getattr(self.pipe, name)

        def __call__(self, prompt: str, *args, **kwargs):
            prompts.append(prompt)
            return self.pipe(prompt, *args, **kwargs)

    with tiny_engine._gen_lock:
        tiny_engine._use_speed(job.speed)
        out = run_pipeline(job, [], None, pipeline=lambda kind: Recorded(tiny_engine._pipeline(kind)), profile="cpu",
                           free=lambda: None, step_down=lambda: None)
    assert prompts == ["full body shot, a hiker", "a hiker"] and len(out.images) == 1
