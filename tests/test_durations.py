"""The GPU seconds a ZeroGPU call asks for: the pure function, the record it learns from, and what the API layer
and the Status tab do with them. The emulated ZeroGPU runs them for real in tests/test_zerogpu.py."""

from __future__ import annotations

import math
import re
import sys
from types import SimpleNamespace
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
    job = _job(num_steps=30, num_images=1, width=1280, height=1280)
    assert api._gpu_duration(job) * 1.5 <= MAX_DURATION_S
    assert api._gpu_duration(_job(num_steps=1, width=64, height=64)) == 10, "the prior's 15 s floor after x1.5"
    with pytest.raises(durations.OverCap):
        api._gpu_duration(_job(num_steps=100, num_images=4, width=1280, height=1280))
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


# --- over the cap: refused with what would fit; the defaults fit ------------------------------------------


def _group_job(people: int, images: int, side: int, refined: int | None = None, **kw: Any) -> Job:
    """A prepared group job as the engine makes it: one `group` entry per person, `refined` small faces (all of
    them unless told) each redrawn at 1024x1024 in every image."""
    refine = [SimpleNamespace(width=1024, height=1024)] * (people if refined is None else refined)
    return _job(width=side, height=side, num_images=images, mode="group", group=[object()] * people, refine=refine,
                **kw)


def _options(sentence: str) -> dict[str, int]:
    """The alternatives a refusal offers, each with the seconds it says it would ask."""
    return {label: int(seconds) for label, seconds in re.findall(r"(?:use |or )([^(]+?) \(about (\d+) s\)", sentence)}


def test_a_group_over_the_cap_is_refused_with_what_would_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: four people, 4 images at 1280x1280 at quality speed. The old code asked for the cap
    (120 s) and ZeroGPU would cut the call off there, after spending the visitor's quota."""
    record = Record()
    monkeypatch.setattr(durations, "RECORD", record)
    monkeypatch.setattr(api, "_duration_factor", lambda: 1.5)
    job = _group_job(4, 4, 1280)
    shape = shape_of(job)
    need = durations.needed_seconds(shape, None, 1.5)
    assert need > MAX_DURATION_S
    with pytest.raises(durations.OverCap) as refused:
        api._gpu_duration(job)
    sentence = str(refused.value)
    assert sentence.startswith(f"This request needs about {need:.0f} s of GPU, more than the {MAX_DURATION_S} s one "
                               "ZeroGPU call may take here: use ")
    options = _options(sentence)
    assert "speed turbo" in options and "speed fast" not in options, "the first faster speed that fits"
    for label, seconds in options.items():
        assert seconds <= MAX_DURATION_S, (label, seconds)
    # Each offered change, made, does fit: priced by the same function as the ask.
    turbo = durations._with_steps(shape, 4, guided=False)
    assert durations.needed_seconds(turbo, None, 1.5) == options["speed turbo"]
    assert record.ask(2, turbo, 1.5, speed="turbo") * 1.5 <= MAX_DURATION_S
    # Nothing is left to observe, and the Status tab has the refused request's row: mode, people, images.
    assert record.last_asked(id(job)) is None
    (row,) = record.report(1.5)["recent"]
    assert (row["request"], row["people"], row["images"], row["asked_s"]) == ("group, 4 people", 4, 4, None)
    assert row["basis"].startswith("refused") and row["needed_s"] == need


def test_a_refusal_names_fewer_images_people_steps_or_no_refinement_when_they_fit() -> None:
    three = shape_of(_group_job(3, 1, 0))  # the automatic 1024x1280 with three small faces refined
    sentence = durations.over_cap(three, None, 1.5, MAX_DURATION_S, "quality")
    assert sentence is not None
    options = _options(sentence)
    assert {"speed fast", "at most 2 people", "refine_faces off"} <= set(options), sentence
    assert any(label.startswith("at most ") and label.endswith(" steps") for label in options)
    two_images = shape_of(_job(num_images=2, width=1280, height=1280, num_steps=60))
    options = _options(durations.over_cap(two_images, None, 1.5, MAX_DURATION_S, "quality") or "")
    assert "at most 1 image" in options and "speed fast" in options
    # Already at turbo: no faster speed to offer; a call that fits is not refused.
    assert "speed" not in (durations.over_cap(shape_of(_group_job(4, 4, 1280, speed="turbo", num_steps=30)), None,
                                              1.5, MAX_DURATION_S, "turbo") or "x")
    assert durations.over_cap(DEFAULT, None, 1.5, MAX_DURATION_S) is None
    # Calibrated figures price the refusal as they price the ask.
    slow = Figures(fixed_s=5.0, step_s=1.5, decode_s=0.5)
    assert durations.over_cap(DEFAULT, slow, 1.0, MAX_DURATION_S) is not None
    assert durations.needed_seconds(DEFAULT, slow, 1.0) == math.ceil(durations.MARGIN * durations.predicted_seconds(
        DEFAULT, slow))


def _zerogpu_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page of a ZeroGPU Space on the default card (spaces' x1.5), before any call was observed. No engine
    of this process (an earlier test's, the tiny preset's sizes) may stand in for ZeroGPU's profile."""
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(api, "_duration_factor", lambda: 1.5)
    monkeypatch.setattr(durations, "RECORD", Record())
    if "instantid.engine" in sys.modules:
        monkeypatch.setattr(sys.modules["instantid.engine"], "_engine", None)


@pytest.mark.parametrize("mode", ["generate", "restyle", "swap", "group"])
def test_the_defaults_of_every_mode_fit_one_call_at_quality_speed(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Priced as the page prices them before the click, by the prior on the default card (spaces' x1.5)."""
    _zerogpu_page(monkeypatch)
    line = api.estimate(mode, {})
    seconds = int(re.search(r"about (\d+) s of your ZeroGPU quota", line).group(1))
    assert seconds <= MAX_DURATION_S and f"one call may take {MAX_DURATION_S} s" in line and "quality" in line
    shape, speed = api._settings_shape(mode, {}, *api._profile())
    assert speed == "quality" and durations.needed_seconds(shape, None, 1.5) == seconds
    if mode == "group":
        # Two people side by side at 1280x832: faces large enough that none is refined.
        assert (shape.people, shape.refine_passes, round(shape.megapixels * 2**20)) == (2, 0, 1280 * 832)


def test_the_page_estimate_follows_people_images_size_and_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    _zerogpu_page(monkeypatch)
    photo = {"path": "/tmp/x.png"}  # the page sends uploads unconverted: only whether a slot is filled counts
    two = api.estimate("group", {"person_1": [photo], "person_2": [photo]})
    three = api.estimate("group", {"person_1": [photo], "person_2": [photo], "person_3": [photo]})
    assert "2 people, 1 image" in two and "over the limit" not in two
    # Three people side by side: faces small enough to refine; the 124 s (1280x832).
    assert "(3 people, 1 image, speed quality): over the limit, would be refused. It needs about 124 s" in three
    assert _options(three)["speed fast"] <= MAX_DURATION_S
    big = {f"person_{k}": [photo] for k in range(1, 5)} | {"num_images": 4, "width": 1280, "height": 1280}
    assert "speed turbo" in api.estimate("group", big)
    turbo = api.estimate("group", big | {"speed": "turbo"})
    assert "4 people, 4 images, speed turbo" in turbo and "over the limit" not in turbo
    sizes = [api.estimate("generate", {"width": side, "height": side}) for side in (512, 1024)]
    assert sizes[0] != sizes[1]
    assert api.estimate("generate", {"num_images": 2}) != api.estimate("generate", {})
    # Off ZeroGPU: nothing before anything was observed, then the expected time from what was.
    monkeypatch.delenv("SPACES_ZERO_GPU")
    monkeypatch.setattr(api, "_profile", lambda: (SimpleNamespace(default_steps=None, max_images=4), 1024))
    assert api.estimate("generate", {}) == ""
    durations.RECORD.observe(0, DEFAULT, _timings(9.0, 0.3), wall_s=12.0)
    assert api.estimate("generate", {}) == ("**GPU time** (1 image, speed quality): about 12 s expected on this "
                                            "hardware, from the runs so far.")
    assert api.estimate("generate", {"num_steps": "many"}) == "", "a value being typed never raises"


def test_the_timings_report_asked_and_used_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    from instantid.request.requests import Rendered

    record = Record()
    monkeypatch.setattr(durations, "RECORD", record)
    monkeypatch.setattr(api, "_duration_factor", lambda: 1.5)
    job = _job(width=1024, height=1280)
    seconds = api._gpu_duration(job)
    rendered = Rendered(images=[], timings_ms=_timings(9.0, 0.3))
    api._observe(job, rendered, 12.0)
    assert rendered.timings_ms["gpu_asked_ms"] == durations.asked_after_factor(seconds, 1.5) * 1000 == 34000
    assert rendered.timings_ms["gpu_used_ms"] == 12000
    rendered = Rendered(images=[], timings_ms=_timings(9.0, 0.3))
    api._observe(_job(), rendered, 5.0)  # off ZeroGPU: nothing asked
    assert "gpu_asked_ms" not in rendered.timings_ms and rendered.timings_ms["gpu_used_ms"] == 5000


def test_status_rows_name_the_mode_the_people_and_the_images() -> None:
    record = Record()
    group = shape_of(_group_job(3, 2, 768, refined=0))
    record.ask(1, group, factor=1.0)
    record.observe(1, group, _timings(9.0, 0.3), wall_s=12.0, mode="group")
    record.observe(2, DEFAULT, _timings(9.0, 0.3), wall_s=12.0, mode="generate")
    rows = record.report(1.0)["recent"]
    assert [(r["request"], r["people"], r["images"]) for r in rows] == [("group, 3 people", 3, 2), ("generate", 1, 1)]
    table = status_tab.format_durations({"durations": record.report(1.0)})
    assert "| generate | 30 | 1 |" in table and "| group, 3 people | 30 | 2 |" in table


def test_where_no_single_change_fits_the_refusal_names_changes_that_fit_together() -> None:
    slow = Figures(fixed_s=5.0, step_s=16.0, decode_s=1.0)  # a slow worker's figures
    shape = shape_of(_group_job(4, 4, 1280))
    sentence = durations.over_cap(shape, slow, 1.0, MAX_DURATION_S, "quality")
    found = re.fullmatch(r"This request needs about \d+ s of GPU, more than the 120 s one ZeroGPU call may take here: "
                         r"use speed turbo, 1 image, 2 people, refine_faces off and a size of at most (\d+)x\1 "
                         r"together \(about (\d+) s\)\.", sentence or "")
    assert found, sentence
    side, seconds = int(found[1]), int(found[2])
    fitted = Shape(steps=4, images=1, megapixels=side * side / 2**20, guided=False, unet_passes=2)
    assert durations.needed_seconds(fitted, slow, 1.0) == seconds <= MAX_DURATION_S
    bigger = Shape(steps=4, images=1, megapixels=(side + 64) ** 2 / 2**20, guided=False, unet_passes=2)
    assert durations.needed_seconds(bigger, slow, 1.0) > MAX_DURATION_S, "the largest size that fits"
    # A worker whose fixed cost alone passes the cap: nothing fits, and the sentence says so.
    hopeless = durations.over_cap(shape, Figures(fixed_s=200.0, step_s=1.0, decode_s=1.0), 1.0, MAX_DURATION_S)
    assert hopeless is not None and hopeless.endswith("even at its smallest: this server cannot run it on ZeroGPU.")
