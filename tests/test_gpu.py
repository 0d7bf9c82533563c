"""GPU-only checks (skipped without CUDA): every GPU profile generates on the tiny preset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from instantid.request.requests import Request

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("profile_name", ["large", "medium", "small"])
def test_profiles_generate(tiny_settings, photos, profile_name: str) -> None:
    import torch

    from instantid.engine import Engine

    settings = dataclasses.replace(tiny_settings, memory_profile=profile_name)
    engine = Engine(settings)
    assert engine.profile.name == profile_name
    # All three extra controls: the depth and pose estimators run on the GPU in the large profile.
    request = Request(face_images=[photos["astronaut"]], prompt="x", num_steps=2, seed=1,
                              controlnets={"canny": 0.4, "depth": 0.4, "pose": 0.4})
    torch.cuda.reset_peak_memory_stats()
    a = engine.run(request)
    b = engine.run(request)
    # Model offload keeps the face embedding on the execution device: a mismatch would raise above.
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    report = engine.report()
    assert report["gpu"]["peak_allocated"] > 0


def test_resident_start_up_on_a_real_gpu(tiny_settings, photos) -> None:
    """ZeroGPU's start-up mode on real CUDA: everything loaded up front, then the three stages."""
    import torch

    from instantid.engine import Engine

    engine = Engine(dataclasses.replace(tiny_settings, memory_profile="large"))
    engine.load_all()
    assert engine.unavailable == {} and {"fast", "turbo", "lcm"} <= set(engine.loras.names)
    nets = [engine.pipe.unet, *engine._extra_nets.values(), engine._estimators["depth"].model]
    assert all(next(n.parameters()).device.type == "cuda" for n in nets)
    request = Request(face_images=[photos["astronaut"]], prompt="x", num_steps=2, seed=1, enable_lcm=True,
                              controlnets={"depth": 0.4, "pose": 0.4})
    job = engine.prepare(request)
    result = engine.finish(job, engine.render(job))
    assert len(result.images) == 1 and torch.cuda.max_memory_allocated() > 0
    names = {c["name"] for c in engine.report()["components"]}
    assert {"lcm_lora", "controlnet_depth", "controlnet_pose", "depth_model"} <= names


@pytest.mark.parametrize("profile_name", ["large", "medium", "small"])
def test_restyle_and_swap_on_every_profile(tiny_settings, photos, profile_name: str) -> None:
    """The img2img and inpaint pipelines share the base pipeline's modules and its placement (offload hooks
    included): each mode runs, twice the same, between generations, on every GPU profile."""
    from instantid.engine import Engine

    engine = Engine(dataclasses.replace(tiny_settings, memory_profile=profile_name))
    face = [photos["astronaut"]]
    requests = [
        Request(face_images=face, mode="restyle", source_image=photos["hanks"], num_steps=4, seed=1),
        Request(face_images=face, mode="swap", target_image=photos["group"], num_steps=2, seed=1),
        Request(face_images=face, num_steps=2, seed=1),
    ]
    first = [np.asarray(engine.run(r).images[0]) for r in requests]
    again = [np.asarray(engine.run(r).images[0]) for r in requests]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
