"""GPU-only checks (skipped without CUDA): every GPU profile generates on the tiny preset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from instantid.requests import GenerateRequest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("profile_name", ["large", "medium", "small"])
def test_profiles_generate(tiny_settings, photos, profile_name: str) -> None:  # noqa: ANN001
    import torch

    from instantid.engine import Engine

    settings = dataclasses.replace(tiny_settings, memory_profile=profile_name)
    engine = Engine(settings)
    assert engine.profile.name == profile_name
    request = GenerateRequest(face_images=[photos["astronaut"]], prompt="x", num_steps=2, seed=1,
                              controlnets={"canny": 0.4})
    torch.cuda.reset_peak_memory_stats()
    a = engine.generate(request)
    b = engine.generate(request)
    # Model offload keeps the face embedding on the execution device: a mismatch would raise above.
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    report = engine.report()
    assert report["gpu"]["peak_allocated"] > 0
