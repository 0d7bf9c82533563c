"""Refining small faces (refine_faces) on the tiny preset: each small face redrawn as a swap onto the image,
nothing else touched; on by default for Group only; its GPU time counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instantid.errors import InvalidParameter
from instantid.request import durations
from instantid.request.requests import Request

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT, HOPPER = (str(ROOT / "assets" / name) for name in ("astronaut.jpg", "grace_hopper.jpg"))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_group_refines_its_small_faces_and_nothing_else(tiny_engine, photos) -> None:
    """t1.jpg's faces are small: laid out on the canvas, both people's faces are under a quarter of the working
    size, and Group (refine_faces "auto") redraws them; outside their feathered regions every pixel is the
    unrefined image's."""
    common = {"mode": "group", "people": [[ASTRONAUT], [HOPPER]], "names": "Ada, Ben", "layout_image":
              str(photos["group"]), "prompt": "two friends", "num_steps": 2, "seed": 3}
    request = Request(**common)
    job = tiny_engine.prepare(request)
    assert [plan.label for plan in job.refine] == ["Ada", "Ben"]
    refined = tiny_engine.finish(job, tiny_engine.render(job))
    plain = tiny_engine.run(Request(**common, refine_faces="off"))
    assert plain.refined == [] and not any("Refined" in w for w in plain.warnings)
    assert refined.refined == ["Ada", "Ben"]
    assert "Refined small face(s), re-rendered at working size: Ada, Ben." in refined.warnings

    inside = np.zeros((job.height, job.width), dtype=bool)
    changed = np.any(pixels(refined) != pixels(plain), axis=2)
    for plan in job.refine:
        x1, y1, x2, y2 = plan.box
        region = np.zeros_like(inside)
        region[y1:y2, x1:x2] = plan.region > 0
        assert changed[region].mean() > 0.5  # the face was redrawn
        inside |= region
    assert not changed[~inside].any() and (~inside).sum() > 0


def test_generate_and_restyle_refine_only_when_asked(tiny_engine, photos) -> None:
    """Same small face (t1.jpg as the pose photo): "auto" leaves it for Generate, "on" redraws it; the GPU time
    asked counts each refined face in each image, through the whole schedule, at its working size."""
    common = {"face_images": [HOPPER], "pose_image": str(photos["group"]), "prompt": "a portrait", "num_steps": 2,
              "seed": 5, "num_images": 2}
    auto = tiny_engine.prepare(Request(**common))
    on = tiny_engine.prepare(Request(**common, refine_faces="on"))
    assert auto.refine == [] and [plan.label for plan in on.refine] == ["the face"]
    plan = on.refine[0]
    shape, base = durations.shape_of(on), durations.shape_of(auto)
    assert (shape.refine_passes, shape.refine_steps) == (2, 2)
    assert shape.refine_megapixels == plan.width * plan.height / durations.MEGAPIXEL
    guided = 2 if on.guidance_scale > 1 else 1
    assert shape.step_units == pytest.approx(base.step_units + 2 * 2 * guided * shape.refine_megapixels)
    unobserved = durations.Figures()
    assert durations.predicted_seconds(shape, unobserved) > durations.predicted_seconds(base, unobserved)
    assert on.total_steps == 2 + 2 * 2
    result = tiny_engine.finish(on, tiny_engine.render(on))
    assert result.refined == ["the face"] and len(result.images) == 2

    restyle = {"face_images": [HOPPER], "source_image": str(photos["group"]), "mode": "restyle", "num_steps": 2}
    assert tiny_engine.prepare(Request(**restyle)).refine == []
    assert len(tiny_engine.prepare(Request(**restyle, refine_faces="on")).refine) == 1


def test_refine_faces_is_checked() -> None:
    with pytest.raises(InvalidParameter, match="choose one of auto, on, off"):
        Request(face_images=[HOPPER], refine_faces="yes")
    with pytest.raises(InvalidParameter, match="is not used by swap"):
        Request(face_images=[HOPPER], mode="swap", target_image=HOPPER, refine_faces="on")
    assert Request(mode="group", people=[[HOPPER]]).refines
    assert not Request(mode="group", people=[[HOPPER]], refine_faces="off").refines
    assert not Request(face_images=[HOPPER]).refines
