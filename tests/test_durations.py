"""The GPU seconds a ZeroGPU call asks for: the pure function, the record it learns from, and what the API layer
and the Status tab do with them. The emulated ZeroGPU runs them for real in tests/test_zerogpu.py."""

from __future__ import annotations

from typing import Any

import pytest

from instantid.frontends import api, status_tab
from instantid.request import durations
from instantid.request.durations import MAX_DURATION_S, Figures, Record, Shape, ask_seconds, shape_of
from instantid.request.requests import Job

# A default request on the real models: 30 guided steps at the automatic 1024x1280, one image.
DEFAULT = Shape(steps=30, images=1, megapixels=1024 * 1280 / 2**20, guided=True)


def _job(**kw: Any) -> Job:
    fields = dict(prompt="x", negative_prompt="", embedding=None, keypoint_image=None, face_mask=None, controls={},
                  width=1024, height=1024, num_images=1, num_steps=30, guidance_scale=5.0, identitynet_strength=0.8,
                  adapter_strength=0.8, scheduler="EulerDiscreteScheduler", speed="quality", seed=1, faces_found=1)
    return Job(**{**fields, **kw})


def _timings(denoise_s: float, decode_s: float = 0.2, controls_s: float = 0.0, gpu_s: float | None = None) -> dict:
    gpu_s = denoise_s + decode_s + controls_s + 0.1 if gpu_s is None else gpu_s
    return {"encode_ms": 100.0, "controls_ms": controls_s * 1000, "denoise_ms": denoise_s * 1000,
            "decode_ms": decode_s * 1000, "gpu_ms": gpu_s * 1000}


# --- the prior -------------------------------------------------------------------------------------------


def test_the_prior_grows_with_every_cost_and_stays_within_its_floor_and_the_cap() -> None:
    def ask(**kw: Any) -> int:
        return ask_seconds(shape_of(_job(**kw)), None)

    base = ask()
    assert durations.PRIOR_MIN_S <= base <= MAX_DURATION_S
    assert ask(num_steps=40) > base and ask(width=1280) > base and ask(num_images=2) > base
    assert ask(controls={"pose": (0.4, None), "depth": (0.4, None)}) > base
    assert ask(guidance_scale=1.0) < base, "without guidance the UNet runs half the batch"
    for values in ([ask(num_steps=n) for n in range(1, 101, 3)], [ask(width=s, height=s) for s in range(64, 1281, 64)],
                   [ask(num_images=n) for n in range(1, 5)]):
        assert values == sorted(values)
    assert ask(num_steps=1, width=64, height=64) == durations.PRIOR_MIN_S
    three = {name: (0.4, None) for name in ("pose", "canny", "depth")}
    assert ask(num_steps=100, num_images=4, width=1280, height=1280, controls=three) == MAX_DURATION_S
    # A speed's LoRA is folded into the weights: its steps cost quality's, so its fewer steps ask for less.
    assert ask(speed="turbo", num_steps=4, guidance_scale=1.0) <= ask(speed="fast", num_steps=8) < base


def test_the_prior_speaks_of_the_blackwell_half_card() -> None:
    """The default request asks, after spaces' 1.5 factor, what the prior says the half Blackwell needs."""
    seconds = ask_seconds(DEFAULT, None, factor=1.5)
    asked = durations.asked_after_factor(seconds, 1.5)
    # 10 s fixed + 1.5 x (30 steps x 2 batch x 1.25 MP x 0.205 s + 1.25 MP x 0.41 s decode) = 33.8 s
    assert asked == 34 and durations.prior_seconds(DEFAULT) == pytest.approx(33.83, abs=0.01)


def test_a_restyle_asks_for_the_steps_it_runs() -> None:
    """img2img runs steps x strength of its steps; a swap is sized by its crop's working size (the job's)."""
    full = ask_seconds(shape_of(_job(num_steps=100, width=1280, height=1280)), None)
    assert ask_seconds(shape_of(_job(num_steps=100, width=1280, height=1280, mode="restyle", strength=1.0)),
                       None) == full
    assert ask_seconds(shape_of(_job(num_steps=100, width=1280, height=1280, mode="restyle", strength=0.3)),
                       None) < full
    assert shape_of(_job(num_steps=30, strength=0.5)).steps == 15


def test_controlnet_passes_are_the_hook_for_more_per_step_work() -> None:
    """Each pass beyond the IdentityNet's adds its share of a step (an extra ControlNet; a group's people are
    UNet passes, tests/test_group.py)."""
    one = Shape(steps=10, images=1, megapixels=1.0, guided=True)
    three = Shape(steps=10, images=1, megapixels=1.0, guided=True, controlnet_passes=3)
    assert three.step_units == pytest.approx(one.step_units * (1 + 2 * durations.CONTROLNET_PASS_SHARE))
    assert shape_of(_job(controls={"canny": (0.4, None), "depth": (0.4, None)})).controlnet_passes == 3


# --- observed figures ------------------------------------------------------------------------------------


def test_the_first_call_uses_the_prior_and_later_calls_the_observed_figures() -> None:
    record = Record()
    shape = DEFAULT
    first = record.ask(1, shape, factor=1.5)
    assert first == ask_seconds(shape, None, factor=1.5)
    # What a call on this card measured: 9 s of denoising, 0.3 s decode, 12 s from asking to the result.
    record.observe(1, shape, _timings(9.0, 0.3), wall_s=12.0, mode="generate")
    figures = record.figures()
    assert figures.step_s == pytest.approx(9.0 / (30 * 2 * shape.megapixels))
    assert figures.fixed_s == pytest.approx(12.0 - 9.0 - 0.3)
    second = record.ask(2, shape, factor=1.5)
    # observed x margin after the factor: 12 s x 1.3 = 15.6 s asked, handed to spaces as 11 s (x 1.5 = 16 s).
    assert second == 11 and durations.asked_after_factor(second, 1.5) == 16
    record.observe(2, shape, _timings(9.0, 0.3), wall_s=12.0)
    rows = record.report(1.5)["recent"]
    assert [(r["asked_s"], r["basis"], r["used_s"]) for r in rows] == [(34, "prior", 12.0), (16, "observed", 12.0)]


def test_a_slow_worker_makes_the_next_ask_larger_and_it_falls_back_after_the_window() -> None:
    record = Record(window=3)
    shape = DEFAULT
    record.observe(0, shape, _timings(9.0), wall_s=12.0)
    usual = record.ask(1, shape, factor=1.0)
    record.observe(1, shape, _timings(27.0), wall_s=30.0)  # a worker three times slower per step
    slow = record.ask(2, shape, factor=1.0)
    assert slow > usual and slow >= 1.3 * 30.0
    for key in range(3, 6):  # the window forgets it after three usual calls
        record.observe(key, shape, _timings(9.0), wall_s=12.0)
    assert record.ask(6, shape, factor=1.0) == usual


def test_a_fresh_worker_start_stays_in_the_ask() -> None:
    """Workers are reused only sometimes: a fork and weight move seen recently is asked for again."""
    record = Record()
    record.observe(0, DEFAULT, _timings(9.0), wall_s=25.0)  # a fresh worker: 15 s before the steps
    record.observe(1, DEFAULT, _timings(9.0), wall_s=10.0)  # a reused one
    assert record.ask(2, DEFAULT, factor=1.0) >= 1.3 * 25.0


def test_the_cap_holds_after_the_factor() -> None:
    huge = Shape(steps=100, images=4, megapixels=1280 * 1280 / 2**20, guided=True, controlnet_passes=4,
                 extra_controls=3)
    for factor in (1.0, 1.5):
        assert durations.asked_after_factor(ask_seconds(huge, None, factor), factor) == MAX_DURATION_S
        slow = Figures(fixed_s=60.0, step_s=1.0, decode_s=1.0, control_s=5.0)
        assert durations.asked_after_factor(ask_seconds(huge, slow, factor), factor) == MAX_DURATION_S
        assert ask_seconds(huge, Figures(step_s=float("inf")), factor) * factor <= MAX_DURATION_S


def test_an_observed_call_asks_at_least_a_few_seconds() -> None:
    tiny = Shape(steps=2, images=1, megapixels=64 * 64 / 2**20, guided=True)
    assert ask_seconds(tiny, Figures(fixed_s=0.1, step_s=0.01, decode_s=0.01), 1.5) * 1.5 >= durations.OBSERVED_MIN_S


def test_a_figure_not_yet_observed_keeps_its_prior() -> None:
    """Calls without extra controls say nothing about the estimators: a call with one asks the prior's."""
    record = Record()
    record.observe(0, DEFAULT, _timings(9.0), wall_s=12.0)
    plain = record.ask(1, DEFAULT, factor=1.0)
    with_depth = Shape(steps=30, images=1, megapixels=DEFAULT.megapixels, guided=True, controlnet_passes=2,
                       extra_controls=1)
    assert record.figures().control_s is None
    assert record.ask(2, with_depth, factor=1.0) >= plain + 1.3 * durations.PRIOR_CONTROL_S


def test_a_call_that_timed_nothing_or_was_cancelled_teaches_nothing() -> None:
    record = Record()
    record.observe(0, DEFAULT, {}, wall_s=3.0)  # a worker that timed nothing
    assert not record.figures().observed
    record.forget(7)  # a cancelled call's ask is dropped; forgetting twice is harmless
    record.forget(7)


# --- the API layer and the Status tab --------------------------------------------------------------------


def test_the_duration_function_asks_the_record_and_counts_the_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    record = Record()
    monkeypatch.setattr(durations, "RECORD", record)
    monkeypatch.setattr(api, "_duration_factor", lambda: 1.5)
    job = _job(num_steps=100, num_images=4, width=1280, height=1280)
    assert api._gpu_duration(job) * 1.5 <= MAX_DURATION_S
    assert api._gpu_duration(_job(num_steps=1, width=64, height=64)) == 10, "the prior's 15 s floor after x1.5"
    assert api._gpu_duration(_job(num_steps="many")) == 80, "invalid values ask for the most"


def test_a_generation_feeds_the_record_and_the_status_report(
    monkeypatch: pytest.MonkeyPatch, tiny_engine: Any, photos: dict
) -> None:
    """Off ZeroGPU nothing is asked, but the measurements of the real (tiny) GPU stage still reach the record."""
    record = Record()
    monkeypatch.setattr(durations, "RECORD", record)
    monkeypatch.setattr(api, "_engine", lambda: tiny_engine)
    outputs = list(api.generate(str(photos["astronaut"]), "x", num_steps=3, width=128, height=128, seed=1))[-1]
    assert "gpu_ms" in outputs[-1], "the GPU function's own time is among the timings"
    figures = record.figures()
    assert figures.observed and figures.step_s > 0 and figures.fixed_s >= 0 and figures.decode_s > 0
    section = api.status()["durations"]
    assert section["basis"] == "observed" and section["cap_s"] == MAX_DURATION_S
    (row,) = section["recent"]
    assert row["asked_s"] is None and row["basis"] == "not asked" and row["steps"] == 3 and row["used_s"] > 0


def test_the_status_tab_shows_asked_and_used_seconds() -> None:
    record = Record()
    record.ask(1, DEFAULT, factor=1.5)
    record.observe(1, DEFAULT, _timings(9.0, 0.3, gpu_s=9.9), wall_s=12.0, mode="generate")
    record.ask(2, DEFAULT, factor=1.5)
    record.observe(2, DEFAULT, _timings(9.0, 0.3, gpu_s=9.9), wall_s=11.5, mode="restyle")
    report = {"state": {"phase": "ready"}, "durations": record.report(1.5)}
    profile_text = status_tab.render_status(report, [], now=0.0)[4]
    table = status_tab.format_durations(report)
    assert table in profile_text
    lines = table.splitlines()
    assert "x1.5" in lines[0] and "120 s" in lines[0] and "x 1.3" in lines[0]
    rows = [line for line in lines if line.startswith("| restyle") or line.startswith("| generate")]
    assert rows == ["| restyle | 30 | 1 | 1.25 | 16 s (observed) | 11.5 s | 9.9 s |",
                    "| generate | 30 | 1 | 1.25 | 34 s (prior) | 12.0 s | 9.9 s |"], "newest first"
    assert "nothing observed yet" in status_tab.format_durations({"durations": Record().report(1.0)})
    assert status_tab.format_durations({}) == ""
