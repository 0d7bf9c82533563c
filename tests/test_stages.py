"""The request's stages as rooms of their own: prepare runs with the face models alone, handed what it needs
(no engine, no diffusion model), and gives the job the engine gives."""

from __future__ import annotations

import time

import numpy as np
import pytest

from instantid.declaration import MODES
from instantid.errors import NoFaceError
from instantid.models.loading import load_face_analyzer
from instantid.models.memory import PROFILES
from instantid.request.prepare import prepare
from instantid.request.requests import Request
from instantid.request.scenes import Workshop


def _requests(photos) -> dict[str, Request]:
    face, group = str(photos["astronaut"]), str(photos["group"])
    return {
        "generate": Request(face_images=[face], pose_image=group, seed=3, enhance_face_region=True),
        "restyle": Request(mode="restyle", face_images=[face], source_image=group, seed=3),
        "swap": Request(mode="swap", face_images=[face], target_image=group, face_index=1, seed=3),
        "group": Request(mode="group", people=[[face], [str(photos["hanks"])]], seed=3),
    }


def test_prepare_needs_only_the_face_models_and_gives_the_engine_s_job(tiny_settings, tiny_engine, photos) -> None:
    analyzer = load_face_analyzer(tiny_settings)
    # The engine's settings and profile as values, its face analyzer as a function: nothing else of it.
    workshop = Workshop(tiny_settings, tiny_engine.profile, lambda: analyzer)
    requests = _requests(photos)
    assert set(requests) == set(MODES)
    for mode, request in requests.items():
        job = prepare(request, workshop, time.time())
        expected = tiny_engine.prepare(request)
        assert (job.width, job.height, job.num_steps, job.warnings) == (
            expected.width, expected.height, expected.num_steps, expected.warnings), mode
        assert np.array_equal(np.asarray(job.keypoint_image), np.asarray(expected.keypoint_image)), mode
        assert len(job.refine) == len(expected.refine), mode


def test_a_scene_refuses_in_the_stage_itself(tiny_settings, photos) -> None:
    analyzer = load_face_analyzer(tiny_settings)
    workshop = Workshop(tiny_settings, PROFILES["cpu"], lambda: analyzer)
    with pytest.raises(NoFaceError, match="pose photo"):
        prepare(Request(face_images=[str(photos["astronaut"])], pose_image=str(photos["noface"])), workshop,
                time.time())
