"""The live preview: the latent-to-RGB projection, and the engine's previews of a run (group and refinement too)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from instantid.models.preview import LATENT_RGB_BIAS, PREVIEWS_PER_RUN, latent_preview, preview_every
from instantid.request.requests import Rendered, Request, Step

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT, HOPPER = (str(ROOT / "assets" / name) for name in ("astronaut.jpg", "grace_hopper.jpg"))


def test_projection_shape_dtype_range_and_determinism() -> None:
    """SDXL's latent size for 1024 x 768 (128 x 96), a batch of two: the first image's RGB at latent resolution."""
    latents = torch.randn(2, 4, 128, 96, generator=torch.Generator().manual_seed(0)) * 3
    rgb = latent_preview(latents)
    assert rgb.shape == (128, 96, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255  # a wide input fills the range, clipped, not wrapped around
    assert np.array_equal(rgb, latent_preview(latents.clone()))
    assert np.array_equal(rgb, latent_preview(latents[:1])), "the first image of the batch"
    assert not np.array_equal(rgb, latent_preview(latents[1:]))
    assert np.array_equal(latent_preview(latents.half()), latent_preview(latents.half().float()))


def test_projection_values() -> None:
    """Zero latents give the bias's colour; one channel alone gives its row of the map (on the -1..1 scale)."""
    zeros = latent_preview(torch.zeros(1, 4, 2, 3))
    expected = np.round((np.array(LATENT_RGB_BIAS) + 1) * 127.5).astype(np.uint8)
    assert (zeros == expected).all()
    first = torch.zeros(1, 4, 1, 1)
    first[0, 0] = 1.0  # channel 0: (0.3651, 0.4232, 0.4341) + bias
    assert latent_preview(first)[0, 0].tolist() == [int(round((v + b + 1) * 127.5)) for v, b in
                                                     zip((0.3651, 0.4232, 0.4341), LATENT_RGB_BIAS, strict=True)]
    nan = torch.full((1, 4, 1, 1), float("nan"))  # a diverged run: mid grey, not whatever NaN casts to
    assert latent_preview(nan)[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="expected"):
        latent_preview(torch.zeros(1, 9, 4, 4))


def test_preview_cadence() -> None:
    assert [preview_every(n) for n in (1, 4, 8, 20, 30)] == [1, 1, 1, 3, 4]
    assert all(n // preview_every(n) <= PREVIEWS_PER_RUN for n in range(1, 101))


def _steps(engine, request: Request) -> tuple[list[Step], Rendered, object]:
    job = engine.prepare(request)
    events = list(engine.render_steps(job))
    steps = [e for e in events if isinstance(e, Step)]
    assert isinstance(events[-1], Rendered)
    return steps, events[-1], job


def test_a_run_previews_every_few_steps_and_the_image_is_unchanged(tiny_engine) -> None:
    """Two images: the preview is the first's, at latent resolution, never at the last step; it crosses ZeroGPU's
    process boundary (pickled inside its Step); the images are those of a run without previews."""
    request = Request(face_images=[ASTRONAUT], prompt="a portrait", num_steps=8, num_images=2, seed=4)
    steps, rendered, job = _steps(tiny_engine, request)
    assert [s.done for s in steps] == list(range(1, 9))
    shown = [s.done for s in steps if s.preview is not None]
    assert shown == list(range(1, 8))
    factor = tiny_engine.pipe.vae_scale_factor
    for s in steps:
        if s.preview is not None:
            assert s.preview.shape == (job.height // factor, job.width // factor, 3) and s.preview.dtype == np.uint8
    crossed = pickle.loads(pickle.dumps(steps[0]))
    assert np.array_equal(crossed.preview, steps[0].preview) and crossed == steps[0]
    plain = tiny_engine.render(tiny_engine.prepare(request))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(rendered.images, plain.images, strict=True))


def test_group_previews_and_refinement_says_so(tiny_engine, photos) -> None:
    """A group (one UNet pass per person per step) previews like Generate; its refined faces' passes (crops) show
    no preview of their own and say they are refining."""
    request = Request(mode="group", people=[[ASTRONAUT], [HOPPER]], names="Ada, Ben", layout_image=str(photos["group"]),
                      prompt="two friends", num_steps=4, seed=3)
    steps, rendered, job = _steps(tiny_engine, request)
    assert job.refine, "t1's small faces are refined"
    assert steps[-1].done == steps[-1].total == job.total_steps
    main = [s for s in steps if s.done <= job.denoising_steps]
    assert [s.done for s in main if s.preview is not None] == [1, 2, 3]
    assert {s.stage for s in main} == {"denoising"}
    refining = [s for s in steps if s.done > job.denoising_steps]
    assert refining and {s.stage for s in refining} == {"refining faces"} and all(s.preview is None for s in refining)
    assert rendered.images
