"""The `speed` choice: each speed's sampling, its LoRA folded into the UNet and taken out again exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from instantid.declaration import SPEEDS
from instantid.errors import CheckpointError, InvalidParameter
from instantid.request.requests import Request


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Every UNet and IdentityNet tensor, copied."""
    nets = {"unet": engine.pipe.unet, "identitynet": engine.pipe.controlnet}
    return {f"{n}.{k}": v.detach().clone() for n, net in nets.items() for k, v in net.state_dict().items()}


def request(photos, **kw) -> Request:
    kw.setdefault("face_images", [photos["astronaut"]])
    kw.setdefault("prompt", "a portrait")
    kw.setdefault("seed", 3)
    return Request(**kw)


@pytest.fixture(scope="module")
def speed_engine(tiny_settings):
    """An engine of its own: these tests fold LoRAs in and must start from freshly loaded weights."""
    from instantid.engine import Engine

    engine = Engine(tiny_settings)
    engine.ensure_loaded()
    return engine


def test_each_speed_samples_as_its_card_says(speed_engine, photos) -> None:
    """Automatic steps, guidance and sampler per speed; what a speed ignores is said."""
    # The cpu profile runs quality with fewer steps; a LoRA speed keeps the count it was distilled for.
    for name, steps, guidance, scheduler in [
        ("quality", speed_engine.profile.default_steps or 30, 5.0, "EulerDiscreteScheduler"),
        ("fast", 8, 5.0, "DDIMScheduler-trailing"),
        ("turbo", 4, 1.0, "EulerDiscreteScheduler-trailing"),
    ]:
        job = speed_engine.prepare(request(photos, speed=name))
        assert (job.speed, job.num_steps, job.guidance_scale, job.scheduler) == (name, steps, guidance, scheduler)
        assert job.warnings == []
    lcm = speed_engine.prepare(request(photos, enable_lcm=True))
    assert (lcm.speed, lcm.num_steps, lcm.guidance_scale, lcm.scheduler) == ("lcm", 5, 1.5, "LCMScheduler")
    explicit = speed_engine.prepare(request(photos, speed="fast", num_steps=6, guidance_scale=7.0))
    assert (explicit.num_steps, explicit.guidance_scale) == (6, 7.0)
    asked = {"negative_prompt": "blurry", "scheduler": "HeunDiscreteScheduler"}
    told = speed_engine.prepare(request(photos, speed="turbo", **asked))
    assert told.scheduler == "EulerDiscreteScheduler-trailing"
    assert any("own sampler" in w for w in told.warnings) and any("negative prompt" in w for w in told.warnings)


def test_lcm_is_a_speed_of_its_own() -> None:
    with pytest.raises(InvalidParameter, match="speed='fast'.*switch LCM off"):
        Request(face_images=["x.png"], enable_lcm=True, speed="fast")
    with pytest.raises(InvalidParameter, match="speed='warp': choose one of quality, fast, turbo"):
        Request(face_images=["x.png"], speed="warp")


def test_switching_speeds_fifty_times_restores_every_weight_exactly(speed_engine, photos) -> None:
    """quality / fast / turbo / quality, 50 times: the base weights come back bit for bit each time, and a
    speed's weights are the same whichever way it was reached."""
    loras = speed_engine.loras
    assert loras.mode == "fused"  # the cpu profile keeps everything resident
    for name in ("fast", "turbo", "lcm"):
        speed_engine._lora(name)
    loaded = snapshot(speed_engine)
    folded: dict[str, dict[str, torch.Tensor]] = {}
    for cycle, name in enumerate(itertools.islice(itertools.cycle(["quality", "fast", "turbo", "quality"]), 200)):
        loras.use(None if name == "quality" else name)
        now = snapshot(speed_engine)
        if name == "quality":
            assert all(torch.equal(now[k], loaded[k]) for k in loaded), f"base weights drifted at switch {cycle}"
        else:
            changed = [k for k in loaded if not torch.equal(now[k], loaded[k])]
            assert changed and all(k.startswith("unet.") for k in changed)  # the IdentityNet is never touched
            first = folded.setdefault(name, now)
            assert all(torch.equal(now[k], first[k]) for k in changed), f"{name} differs at switch {cycle}"
    loras.use(None)


def test_fused_weights_give_the_adapters_output(speed_engine) -> None:
    """The folded weights compute what peft's adapter layers compute (linear and 3x3 convolution layers)."""
    from instantid.models.loading import load_speed_lora
    from instantid.models.loras import LoraSwitch

    unet = speed_engine.pipe.unet
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    hidden = torch.randn(1, 8, cfg.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                        generator=gen), "time_ids": torch.randn(1, 6, generator=gen)}
    # The IP-attention processors expect face tokens after the text: give them the resampler's count.
    tokens = torch.cat([hidden, torch.randn(1, speed_engine.pipe.num_face_tokens, cfg.cross_attention_dim,
                                            generator=gen)], dim=1)

    def out() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, 10, tokens, added_cond_kwargs=added, return_dict=False)[0]

    speed_engine.loras.use(None)
    base = out()
    speed_engine.loras.use("fast")
    fused = out()
    speed_engine.loras.use(None)
    adapters = LoraSwitch(speed_engine.pipe, "adapter")
    load_speed_lora(adapters, speed_engine.settings, "fast")
    try:
        adapters.use("fast")
        peft = out()
        adapters.use(None)
        assert torch.equal(out(), base)  # adapters off: the base output, exactly
    finally:
        speed_engine.pipe.unload_lora_weights()
    assert not torch.allclose(fused, base, atol=1e-3)
    torch.testing.assert_close(fused, peft, rtol=1e-4, atol=1e-4)


def test_every_speed_generates_and_quality_comes_back(speed_engine, photos) -> None:
    quality = speed_engine.run(request(photos, num_steps=2))
    images = {}
    for name in ("fast", "turbo", "quality"):
        images[name] = speed_engine.run(request(photos, speed=name, num_steps=2))
    assert not np.array_equal(np.asarray(images["fast"].images[0]), np.asarray(quality.images[0]))
    assert not np.array_equal(np.asarray(images["turbo"].images[0]), np.asarray(images["fast"].images[0]))
    assert np.array_equal(np.asarray(images["quality"].images[0]), np.asarray(quality.images[0]))


def test_a_speed_whose_lora_failed_is_refused_with_the_reason(tiny_settings, photos) -> None:
    from dataclasses import replace

    from instantid.engine import Engine

    engine = Engine(replace(tiny_settings, turbo_lora="instantid-tiny/no-such-lora"))
    engine.load_all()
    assert set(engine.unavailable) == {"turbo"}
    with pytest.raises(CheckpointError, match="Speed turbo is not available on this server.*choose speed quality"):
        engine.check(request(photos, speed="turbo"))
    engine.check(request(photos, speed="fast"))  # the others still serve


def test_speed_defaults_are_declared_once() -> None:
    """The page's and the API's help name each speed's steps from the same records the engine uses."""
    from instantid.declaration import PARAMS

    for s in SPEEDS.values():
        assert f"{s.steps} {s.name}" in PARAMS["num_steps"].info
