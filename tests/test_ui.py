"""The UI builders and the API layer with fake callables and a fake engine: no models, no server."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

from instantid.declaration import DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_SEED
from instantid.errors import InvalidParameter, NoFaceError
from instantid.frontends import api, hints, status_tab, ui
from instantid.request.requests import Job, Partial, Rendered, Request, Result, Step
from instantid.settings import Settings
from tests.apprunner import call_events, free_port

ROOT = Path(__file__).resolve().parents[1]
FACE = str(ROOT / "assets" / "astronaut.jpg")

API_PARAMETERS = [
    "face_image", "prompt", "extra_face_images", "pose_image", "framing", "head_angle", "head_yaw", "head_pitch",
    "negative_prompt", "style", "num_images", "width",
    "height", "num_steps", "guidance_scale", "identitynet_strength", "adapter_strength", "controlnets",
    "scheduler", "speed", "enable_lcm", "seed", "randomize_seed", "enhance_face_region", "refine_faces",
]

REPORT = {
    "host": {
        "total": 16 * 1024**3,
        "available": 9 * 1024**3,
        "process_rss": 3 * 1024**3,
        "process_rss_peak": 4 * 1024**3,
        "used_percent": 43.0,
    },
    "gpu": None,
    "components": [
        {"name": "unet", "device": "cpu", "dtype": "float32", "bytes": 5 * 1024**3, "size": "5.00 GiB",
         "parameters": 2_567_000_000, "offload": None},
    ],
    "profile": {"name": "cpu", "reason": "no CUDA device", "description": "everything on the CPU", "device": "cpu",
                "dtype": "float32", "offload": "none"},
    "state": {"phase": "loading", "progress": 0.5, "message": "base model"},
}


def fake_generate(
    face_image, prompt, extra_face_images=None, pose_image=None, framing="photo", head_angle="photo", head_yaw=None,
    head_pitch=None, negative_prompt="", style="", num_images=1,
    width=0, height=0, num_steps=0, guidance_scale=0.0, identitynet_strength=0.8, adapter_strength=0.8,
    controlnets=None, scheduler="", speed="quality", enable_lcm=False, seed=42, randomize_seed=False,
    enhance_face_region=True, refine_faces="auto",
):
    image = Image.new("RGB", (64, 64))
    yield [(image, "fake")], seed, [0.5], image, {"total_ms": 1.0}


def generate(*args: Any, **kwargs: Any) -> Any:
    """api.generate's final outputs (it yields gr.skip() after each step first)."""
    return list(api.generate(*args, **kwargs))[-1]


def fake_status() -> dict[str, Any]:
    return dict(REPORT)


class FakeEngine:
    """Stands in for instantid.engine.Engine: records requests, can fail on demand."""

    def __init__(self, phase: str = "ready", error: Exception | None = None) -> None:
        self.phase = phase
        self.error = error
        self.requests: list[Request] = []
        self.loads = 0

    @property
    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "progress": 1.0 if self.phase == "ready" else 0.3, "message": ""}

    def report(self) -> dict[str, Any]:
        return {**REPORT, "state": self.state}

    def start_background_load(self) -> None:
        self.loads += 1
        self.phase = "ready"

    def check(self, request: Request) -> None:
        pass

    # The three stages, as the API calls them; the fake's job is the validated request itself.
    def prepare(self, request: Request) -> Request:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return request

    def render_steps(self, job: Request, heartbeat_s: float | None = None):
        yield Step(1, 1)
        yield Rendered(images=[Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(job.num_images)],
                       timings_ms={})

    def finish(self, job: Request, rendered: Rendered) -> Result:
        return self._result(job)

    def run(self, request: Request, progress=None) -> Result:
        return self._result(self.prepare(request))

    def _result(self, request: Request) -> Result:
        n = request.num_images
        return Result(
            images=[Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(n)],
            seed=request.seed if request.seed is not None else 1234,  # the engine draws a missing seed
            similarities=[0.61] + [None] * (n - 1),
            keypoint_image=Image.new("RGB", (64, 64)),
            timings_ms={"total_ms": 12.345},
            width=64,
            height=64,
            num_steps=request.num_steps or DEFAULT_STEPS,
            guidance_scale=request.guidance_scale or DEFAULT_GUIDANCE,
            faces_found=1,
            profile="cpu",
            warnings=[],
        )


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    fake = FakeEngine()
    monkeypatch.setattr(api, "_engine", lambda: fake)
    return fake


# --- the Blocks app ------------------------------------------------------------------------------------


def test_named_endpoints_with_fakes() -> None:
    demo = ui.build_demo({"generate": fake_generate}, fake_status, settings=Settings())
    endpoints = demo.get_api_info()["named_endpoints"]
    assert set(endpoints) == {"/generate", "/status"}, "cheap UI steps must stay out of the API"
    generate = endpoints["/generate"]
    assert [p["parameter_name"] for p in generate["parameters"]] == API_PARAMETERS
    assert [r["label"] for r in generate["returns"]] == [
        "Results", "Seed", "Identity similarity", "Face keypoints", "Timings (ms)",
    ]
    assert endpoints["/status"]["parameters"] == []
    assert endpoints["/status"]["returns"][0]["component"] == "Json"


def test_real_api_functions_match_the_components() -> None:
    """The API names come from api.generate's signature; the components are listed in the same order."""
    assert list(inspect.signature(api.generate).parameters)[:-1] == API_PARAMETERS
    example = {"face_image": FACE, "prompt": "a knight", "style": "Mars"}
    demo = ui.build_demo({"generate": api.generate}, api.status, settings=Settings(), examples={"generate": [example]})
    info = demo.get_api_info()["named_endpoints"]
    params = {p["parameter_name"]: p for p in info["/generate"]["parameters"]}
    assert not params["face_image"]["parameter_has_default"]
    assert not params["prompt"]["parameter_has_default"]
    # Client defaults are the components' initial values: 0 means "the mode default" for steps and guidance.
    assert params["num_steps"]["parameter_default"] == 0
    assert params["guidance_scale"]["parameter_default"] == 0
    assert params["randomize_seed"]["parameter_default"] is False
    assert params["seed"]["parameter_has_default"] and params["seed"]["parameter_default"] is None  # random
    assert params["controlnets"]["parameter_default"] is None
    assert info["/generate"]["description"].startswith("Generate images of the person")


def test_cheap_steps_skip_the_queue_and_the_api(page: Page) -> None:
    """As the page receives them (its config): cheap steps run outside the queue and outside the API."""
    deps = page_events(page)
    for name in ("automatic_steps", "automatic_steps_1", "show_mode", "before_after"):
        assert deps[name]["queue"] is False and deps[name]["api_visibility"] == "private", name
    # The step before a generation is queued (only then does its error reach the page), one per mode.
    runs = [d for name, d in deps.items() if re.fullmatch(r"begin_run(_\d+)?", name)]
    assert len(runs) == 3 and all(d["queue"] is not False and d["api_visibility"] == "private" for d in runs)
    for mode in ("generate", "restyle", "swap"):
        assert deps[mode]["queue"] is not False and deps[mode]["api_visibility"] == "public"
        # No input is an output of a mode's event (an output rebuilt per session loses its input checks).
        assert not set(deps[mode]["inputs"]) & set(deps[mode]["outputs"]), mode
    assert deps["status"]["queue"] is False and deps["status"]["api_visibility"] == "public"


def test_the_step_before_a_generation_never_waits_behind_one(page: Page) -> None:
    """While a generation runs (held here), another visitor's click still gets its seed and cleared results."""
    run = page_events(page)["begin_run"]
    defaults = [p.get("parameter_default") for p in page.api["/generate"]["parameters"]]
    page.hold.set()
    try:
        event_id = httpx.post(f"{page.url}gradio_api/call/generate", json={"data": defaults},
                              timeout=30).json()["event_id"]
        assert page.running.wait(60), "the held generation never started"
        done = queue_call(page, run["id"], [7, False, [], 0.4, 0.4, 0.4])
        assert done.get("success"), done
        assert done["output"]["data"][0] == 7 and not page.release.is_set()
    finally:
        page.release.set()
        page.hold.clear()
    with httpx.stream("GET", f"{page.url}gradio_api/call/generate/{event_id}", timeout=60) as stream:
        assert any("the function was reached" in line for line in stream.iter_lines())


def test_speed_and_lcm_go_back_to_automatic(page: Page) -> None:
    """The page used to send Steps 30 and Guidance 5 (5 and 1.5 with LCM): the cpu profile's automatic 20 steps
    never applied there. 0 is "automatic", as in the API: it follows the speed, LCM and the profile."""
    assert ui.automatic_steps(True) == ui.automatic_steps("turbo") == (0, 0.0)
    config = page.config
    by_id = {c["id"]: c for c in config["components"]}
    steps, guidance = (next(c for c in config["components"] if c["props"].get("label") == label)
                       for label in ("Steps", "Guidance scale"))
    assert steps["props"]["value"] == 0 and guidance["props"]["value"] == 0
    # The steps this server's profile runs (the fake status report's: cpu), not the declaration's 30.
    info = "0 = automatic (20 quality, 8 fast, 4 turbo, 5 lcm with the cpu profile)"
    assert steps["props"]["info"] == info
    # Nothing but the speed and LCM choices write them (no page-load step that shows 30 and 5).
    writers = [dep for dep in config["dependencies"] if {steps["id"], guidance["id"]} & set(dep["outputs"])]
    assert [by_id[dep["targets"][0][0]]["props"]["label"] for dep in writers] == ["Speed", "LCM fast mode"]


def test_randomize_seed_handler() -> None:
    assert ui.next_seed(1234, False) == 1234
    assert ui.next_seed(1234.0, False) == 1234
    seeds = {ui.next_seed(1234, True) for _ in range(20)}
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert len(seeds) > 1
    assert 0 <= ui.next_seed(None, False) <= MAX_SEED


def test_status_rendering() -> None:
    load, memory, plot, table, profile, raw, samples = status_tab.render_status(REPORT, [], now=1000.0)
    assert "loading" in load and "50 %" in load and "base model" in load
    assert "16.00 GiB" in memory and "3.00 GiB" in memory and "no GPU" in memory
    assert list(table.columns) == status_tab.STATUS_COLUMNS
    assert table.iloc[0]["component"] == "unet" and table.iloc[0]["parameters"] == "2.57 B"
    assert "`cpu`" in profile and "no CUDA device" in profile
    assert raw == REPORT
    assert len(samples) == 1 and set(plot["series"]) == {"process RSS"}

    gpu = {"name": "NVIDIA L4", "total": 24 * 1024**3, "free": 20 * 1024**3, "allocated": 2 * 1024**3,
           "reserved": 3 * 1024**3, "peak_allocated": 5 * 1024**3, "emulated": False}
    _, memory, plot, *_ = status_tab.render_status({**REPORT, "gpu": gpu}, samples, now=1004.0)
    assert "NVIDIA L4" in memory and "4.00 GiB of 24.00 GiB" in memory and "5.00 GiB" in memory
    assert {"process RSS", "GPU allocated", "GPU reserved"} == set(plot["series"])

    zero = {"emulated": True, "name": "ZeroGPU slice", "note": "only attached during a generation"}
    _, memory, *_ = status_tab.render_status({**REPORT, "gpu": zero}, [], now=1.0)
    assert "only attached during a generation" in memory


def test_status_says_what_a_ready_server_is_doing() -> None:
    busy = {**REPORT, "state": {"phase": "ready", "message": "ready in 3.0 s", "activity": "generating (step 3 of 30)"}}
    assert "ready in 3.0 s; generating (step 3 of 30)" in status_tab.format_load_state(busy)


def test_timings_read_as_one_line() -> None:
    timings = {"total_ms": 4210.4, "denoise_ms": 3812.0, "faces_ms": 31.2, "decode_ms": 201.0, "new_stage_ms": 5.0}
    assert ui.timings_line(timings) == "Done in 4.2 s: faces 31 ms · denoising 3.8 s · decoding 201 ms · new stage 5 ms"
    assert ui.timings_line({}) == "" and ui.timings_line(None) == ""
    # The API's warnings ride in the same output; the line is about time only.
    assert ui.timings_line({"total_ms": 4210.4, "warnings": ["Empty prompt"]}) == "Done in 4.2 s"
    # The step before a run clears every output of the last one, the summary line included.
    assert ui.start_run(7, False, ["canny"], 0.5, 0.6, 0.7)[1:] == ({"canny": 0.6}, None, None, None, None, None, "")


def test_status_samples_are_capped() -> None:
    samples: list = []
    for i in range(status_tab.MAX_SAMPLES + 10):
        samples = status_tab.add_sample(samples, REPORT, now=float(i))
    assert len(samples) == status_tab.MAX_SAMPLES
    assert samples[0]["t"] == 10.0


def test_memory_history_is_one_spaced_bounded_list() -> None:
    history = status_tab.MemoryHistory(max_samples=5, min_gap_s=2.0)
    for now in (0.0, 1.0, 2.0, 3.5, 4.0):  # 1.0 and 3.5 come too soon after the newest: not added
        history.record(REPORT, now=now)
    assert [s["t"] for s in history.samples()] == [0.0, 2.0, 4.0]
    for i in range(10):
        history.record(REPORT, now=10.0 + 2 * i)
    assert [s["t"] for s in history.samples()] == [20.0, 22.0, 24.0, 26.0, 28.0]


def test_memory_history_is_sampled_without_any_visitor() -> None:
    reports = iter(range(1, 10_000))
    history = status_tab.MemoryHistory(min_gap_s=0.0)
    history.start(lambda: {"host": {"process_rss": next(reports) * status_tab.GIB}}, every_s=0.01)
    for _ in range(1000):  # polled: the thread's pace on a loaded machine is not this test's business
        if len(history.samples()) >= 3:
            break
        time.sleep(0.01)
    rss = [s["process RSS"] for s in history.samples()]
    assert len(rss) >= 3 and rss == sorted(rss), rss


def test_the_status_tab_shows_the_server_s_history_to_every_visitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's history was kept per browser session (a gr.State) and sampled only while that tab was open:
    a reload, or a visitor opening the tab, started it again from one point."""
    clock = iter([1000.0, 1004.0, 1008.0, 1012.0])
    monkeypatch.setattr(status_tab, "time", types.SimpleNamespace(time=lambda: next(clock), sleep=time.sleep))
    demo = ui.build_demo({"generate": fake_generate}, fake_status, settings=Settings())
    with served(demo) as (url, config):
        kinds = {c["id"]: c["type"] for c in config["components"]}
        refreshes = events_named(config, "refresh")
        (tick,) = [d for d in refreshes if d["targets"][0][1] == "tick"]
        opened = [d for d in refreshes if d is not tick]
        assert opened and not tick["inputs"] and not any(d["inputs"] for d in opened), "no per-session history input"
        for _ in range(3):  # one visitor with the tab open
            run_step(url, tick["id"], [])
        plot = run_step(url, opened[0]["id"], [])[opened[0]["outputs"].index(
            next(i for i in opened[0]["outputs"] if kinds[i] == "nativeplot"))]  # another visitor opens the tab
    seconds = plot["columns"].index("seconds")
    assert sorted({row[seconds] for row in plot["data"]}) == [-12.0, -8.0, -4.0, 0.0]


def test_status_rendering_survives_an_empty_report() -> None:
    load, memory, plot, table, profile, raw, samples = status_tab.render_status({}, None, now=0.0)
    assert "unknown" in load and "n/a" in memory and table.empty and plot.empty


# --- api.generate ----------------------------------------------------------------------------------


def test_generate_builds_the_request(engine: FakeEngine) -> None:
    gallery, seed, sims, keypoints, timings = generate(
        FACE, "a knight", extra_face_images=[FACE, {"path": FACE}], controlnets={"canny": 0.7}, num_images=2, seed=7,
    )
    (request,) = engine.requests
    assert request.face_images == [FACE, FACE, FACE]
    assert request.controlnets == {"canny": 0.7}
    assert (request.num_steps, request.guidance_scale) == (None, None), "automatic: the engine fills the defaults"
    assert seed == 7 and request.seed == 7
    assert [caption for _, caption in gallery] == ["#1, seed 7; identity 0.61", "#2, seed 8; no face found"]
    assert sims == [0.61, None]
    assert isinstance(keypoints, Image.Image)
    assert timings == {"total_ms": 12.3, "warnings": []}  # the warnings ride with the timings (gradio_client)


def test_generate_sentinels(engine: FakeEngine) -> None:
    generate(FACE, "x", enable_lcm=True)
    generate(FACE, "x", enable_lcm=True, num_steps=8, guidance_scale=2.0)
    generate(FACE, "x", randomize_seed=True, seed=7)
    generate(FACE, "x", controlnets=["pose", "depth"])
    lcm, explicit, randomized, names = engine.requests
    assert (lcm.num_steps, lcm.guidance_scale) == (None, None)
    assert (explicit.num_steps, explicit.guidance_scale) == (8, 2.0)
    assert randomized.seed is None, "the engine draws the seed (one place)"
    assert names.controlnets == {"pose": 0.4, "depth": 0.4}


def test_generate_turns_user_errors_into_gr_error(engine: FakeEngine) -> None:
    engine.error = NoFaceError("No face found in the face photo: use a photo where the face is visible.")
    with pytest.raises(gr.Error) as caught:
        generate(FACE, "x")
    assert caught.value.message == "No face found in the face photo: use a photo where the face is visible."


def test_generate_validates_before_waiting(engine: FakeEngine) -> None:
    with pytest.raises(gr.Error) as caught:
        generate(FACE, "x", width=100, height=128)
    assert "width" in caught.value.message
    assert engine.requests == []
    with pytest.raises(gr.Error, match="No face photo: add a photo of the person's face"):
        generate(None, "x")  # type: ignore[arg-type]


def test_generate_hides_unexpected_errors(engine: FakeEngine, caplog: pytest.LogCaptureFixture) -> None:
    engine.error = RuntimeError("CUDA kernel exploded at /secret/path.py line 3")
    with pytest.raises(gr.Error) as caught:
        generate(FACE, "x")
    assert caught.value.message == api.GENERIC_ERROR
    assert "secret" not in caught.value.message
    assert "CUDA kernel exploded" in caplog.text, "the traceback belongs in the server log"


def test_generate_starts_a_load_that_nobody_started(engine: FakeEngine) -> None:
    engine.phase = "not loaded"
    generate(FACE, "x")
    assert engine.loads == 1 and len(engine.requests) == 1


def test_generate_passes_engine_progress_to_gradio(engine: FakeEngine) -> None:
    calls = []

    def progress(value, desc=None, unit="steps"):
        calls.append((value, desc))

    generate(FACE, "x", progress=progress)
    assert ((1, 1), "Denoising") in calls


def test_every_step_and_heartbeat_yields_partial_outputs(engine: FakeEngine) -> None:
    """Each yield reached the page as "generating", which reset Gradio's overlay (its timer restarted at 0 and
    its bar went): the page now draws the progress from the intermediate outputs themselves (`Partial`: the
    stage, step i of n and the seconds since the start in the info, the preview in the gallery), the final
    outputs are a plain tuple, and gradio_client's progress still follows every yield."""
    preview = np.zeros((8, 6, 3), np.uint8)

    def render_steps(job: Any, heartbeat_s: float | None = None):
        yield None  # a heartbeat before the first step
        yield Step(1, 3, preview=preview)
        yield None
        yield Step(2, 3)
        yield Step(3, 3, stage="refining faces")
        yield Rendered(images=[Image.new("RGB", (64, 64))], timings_ms={})

    engine.render_steps = render_steps
    seen: list[Any] = []

    def progress(value, desc=None, unit="steps"):
        seen.append((value, desc))

    items = []
    for item in api.generate(FACE, "x", progress=progress):
        items.append(item)
        seen.append(item)
    *partials, final = items
    assert all(isinstance(p, Partial) for p in partials) and type(final) is tuple and len(final) == 5
    where = [p[4]["progress"] for p in partials]
    assert [(w["stage"], w.get("step"), w.get("steps")) for w in where] == [
        ("starting", None, None), ("starting", None, None), ("denoising", 1, 3), ("denoising", 1, 3),
        ("denoising", 2, 3), ("refining faces", 3, 3)]
    elapsed = [w["elapsed_s"] for w in where]
    assert elapsed == sorted(elapsed)
    assert all(p[1:4] == (gr.skip(),) * 3 for p in partials)
    shown = [p[0] for p in partials if p[0] != gr.skip()]
    assert len(shown) == 1 and shown[0][0][1] == "preview, step 1 of 3"
    assert max(shown[0][0][0].size) == api.PREVIEW_SIDE and shown[0][0][0].size[0] < shown[0][0][0].size[1]
    assert "progress" not in final[4] and final[0][0][1].startswith("seed ")
    # gradio_client's job.status(): the latest progress follows each step's and heartbeat's yield.
    after = [seen[i + 1] for i, event in enumerate(seen) if isinstance(event, Partial) and event[4]["progress"][
        "stage"] != "starting"]
    assert after == [((1, 3), "Denoising"), ((1, 3), "Denoising"), ((2, 3), "Denoising"), ((3, 3), "Denoising")]


def test_status_is_the_engine_report(engine: FakeEngine) -> None:
    assert set(api.status()) >= {"host", "gpu", "components", "profile", "state"}


# --- the GPU stage (ZeroGPU's durations: tests/test_durations.py) ---------------------------------


def _job(**kw: Any) -> Job:
    fields = dict(prompt="x", negative_prompt="", embedding=None, keypoint_image=None, face_mask=None, controls={},
                  width=1024, height=1024, num_images=1, num_steps=30, guidance_scale=5.0, identitynet_strength=0.8,
                  adapter_strength=0.8, scheduler="EulerDiscreteScheduler", speed="quality", seed=1, faces_found=1)
    return Job(**{**fields, **kw})


def test_results_pickle() -> None:
    """ZeroGPU sends the request to its worker and the result back through pickle."""
    import pickle

    request = Request(face_images=[FACE], controlnets={"pose": 0.4}, seed=3)
    assert pickle.loads(pickle.dumps(request)) == request
    result = FakeEngine().run(request)
    again = pickle.loads(pickle.dumps(result))
    assert again.seed == result.seed and again.images[0].tobytes() == result.images[0].tobytes()


def test_gpu_stage_errors_cross_the_worker_with_their_message(engine: FakeEngine, caplog) -> None:
    """Only a gr.Error crosses ZeroGPU's process boundary with its message: the GPU stage raises nothing else."""
    import pickle

    from instantid.errors import OutOfMemoryError

    def failing(exc: Exception):
        def render_steps(job: Any, heartbeat_s: float | None = None):
            raise exc
            yield

        return render_steps

    engine.render_steps = failing(OutOfMemoryError("The GPU ran out of memory: use fewer images."))
    with pytest.raises(gr.Error) as caught:
        list(api._render_on_gpu(_job()))
    assert pickle.loads(pickle.dumps(caught.value)).message == "The GPU ran out of memory: use fewer images."
    engine.render_steps = failing(RuntimeError("cuDNN exploded at /secret/path.py"))
    with pytest.raises(gr.Error) as caught:
        list(api._render_on_gpu(_job()))
    assert caught.value.message == api.GENERIC_ERROR and "cuDNN exploded" in caplog.text


def test_ui_and_api_do_not_import_torch() -> None:
    code = ("import sys, instantid.frontends.ui, instantid.frontends.api; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_invalid_parameter_message_is_a_sentence() -> None:
    # The UI shows these verbatim: they must name the argument and say what is allowed.
    message = str(InvalidParameter("width", 100, "use 0 (automatic) or a multiple of 64 up to 1280"))
    assert message.startswith("Invalid width=100") and message.endswith(".")


# --- modes: Generate, Restyle, Face swap --------------------------------------------------------------


def _demo_with_modes() -> gr.Blocks:
    fns = {mode: api.ENDPOINTS[mode] for mode in ("generate", "restyle", "swap")}
    return ui.build_demo(fns, api.status, settings=Settings())


def test_each_mode_is_its_named_endpoint_with_its_own_parameters() -> None:
    from instantid.declaration import params_for

    info = _demo_with_modes().get_api_info()["named_endpoints"]
    assert set(info) == {"/generate", "/restyle", "/swap", "/status"}, "the mode choice stays out of the API"
    for mode in ("generate", "restyle", "swap"):
        names = [p["parameter_name"] for p in info[f"/{mode}"]["parameters"]]
        assert names == list(params_for(mode)) == list(inspect.signature(getattr(api, mode)).parameters)[:-1]
    assert info["/swap"]["description"].startswith("Face swap")
    assert "face_index" in api.swap.__doc__ and "strength:" in api.restyle.__doc__


def test_the_mode_choice_shows_only_that_mode_s_inputs() -> None:
    modes = ["generate", "restyle", "swap"]
    swap, restyle, generate = (ui.visible_in(m, modes) for m in ("swap", "restyle", "generate"))
    assert swap["target_image"] and swap["face_index"] and swap["before_after"] and swap["swap_btn"]
    assert not any(swap[n] for n in ("source_image", "strength", "pose_image", "width", "controls", "generate_btn"))
    assert restyle["source_image"] and restyle["strength"] and restyle["width"] and restyle["controls"]
    assert not any(restyle[n] for n in ("target_image", "pose_image", "before_after"))
    assert generate["pose_image"] and not generate["source_image"] and not generate["target_image"]
    assert "face_image" not in swap and "prompt" not in swap, "inputs every mode takes never hide"


def test_each_mode_shows_its_own_examples(page: Page) -> None:
    datasets = [c["props"] for c in page.config["components"] if c["type"] == "dataset"]
    assert sorted(d["label"] for d in datasets) == [
        "Face swap examples (click one: generated once, then shown again at once)",
        "Generate examples (click one: generated once, then shown again at once)",
    ]
    swap = ui.visible_in("swap", ["generate", "restyle", "swap"])
    assert swap["swap_examples"] and not swap["generate_examples"] and not swap["restyle_examples"]
    # The swap example fills the swap's own inputs and shows a run's summary and before/after too.
    (swap_set,) = [d for d in datasets if d["label"].startswith("Face swap")]
    assert [c["label"] for c in swap_set["component_props"]] == [
        "Face photo", "Photo to swap a face into", "Face to replace (0 = largest)", "Prompt",
    ]
    assert set(page.api) == {"/generate", "/restyle", "/swap", "/status"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"face_image": FACE, "pose": FACE}], r"name \['pose'\]: not parameters of generate"),
        ([{"face_image": FACE, "prompt": "a"}, {"prompt": "b", "face_image": FACE}], "must name the same inputs"),
    ],
)
def test_examples_that_name_other_inputs_are_refused(rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ui.build_demo({"generate": api.generate}, api.status, settings=Settings(), examples={"generate": rows})


# A value each kind of input must refuse as sent (Gradio alone would convert it, or fail without a name).
WRONG_VALUE = {
    "Checkbox": "false",
    "Slider": "1",
    "Number": "1",
    "Textbox": 5,
    "Dropdown": 5,
    "Radio": 5,
    "Json": "pose",
    "Image": {"url": "https://example.com/face.png", "meta": {"_type": "gradio.FileData"}},
    # A file Gradio did not receive: Gradio itself refuses it before any component code runs (its message
    # names no input, so only the refusal is checked for this kind).
    "File": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}],
}


@pytest.mark.parametrize("mode", ["generate", "restyle", "swap"])
def test_mode_steps_are_cheap_and_every_input_is_guarded(page: Page, mode: str) -> None:
    """Every input of every mode checks what is sent before Gradio converts it, and says which input it was."""
    params = page.api[f"/{mode}"]["parameters"]
    defaults = [p.get("parameter_default") for p in params]
    for i, param in enumerate(params):
        assert param["component"] in WRONG_VALUE, f"add a wrong value for a {param['component']} input"
        data = [*defaults[:i], WRONG_VALUE[param["component"]], *defaults[i + 1:]]
        event, message = call(page, mode, data)
        assert event == "error" and "the function was reached" not in str(message), (param, message)
        if param["component"] != "File":
            assert re.search(rf"\b{param['parameter_name']}\b", str(message)), (param["parameter_name"], message)


# --- the page as it is served: its config (what the browser runs) and its endpoints -------------------


@dataclass
class Page:
    url: str
    config: dict[str, Any]  # GET /config: the components and events the browser builds the page from
    api: dict[str, Any]  # gradio_client's view of the named endpoints
    hold: threading.Event  # set: a mode's function waits for `release` (after setting `running`)
    release: threading.Event
    running: threading.Event


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    """The three modes' Blocks on fake functions (they refuse once reached), served in this process."""
    from gradio_client import Client

    hold, release, running = threading.Event(), threading.Event(), threading.Event()

    def fake(real: Any) -> Any:
        @functools.wraps(real)  # the real signature: the API's parameter names and defaults
        def reached(*args: Any, **kwargs: Any) -> Any:
            if hold.is_set():
                running.set()
                release.wait(60)
            raise gr.Error("the function was reached", print_exception=False)

        return reached

    examples = {
        "generate": [{"face_image": FACE, "prompt": "a knight", "style": "Mars"}],
        "swap": [{"face_image": FACE, "target_image": FACE, "face_index": 0, "prompt": "a knight"}],
    }
    fns = {mode: fake(api.ENDPOINTS[mode]) for mode in ("generate", "restyle", "swap")}
    demo = ui.build_demo(fns, fake_status, settings=Settings(), examples=examples)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        config = httpx.get(f"{url}config", timeout=30).json()
        api_info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
        yield Page(url, config, api_info, hold, release, running)
    finally:
        release.set()
        demo.close()


def page_events(page: Page) -> dict[str, dict[str, Any]]:
    """The page's events by name (Gradio numbers repeats: start_run, start_run_1, ...)."""
    return {d["api_name"]: d for d in page.config["dependencies"]}


def call(page: Page, api_name: str, data: list[Any]) -> tuple[str, str | None]:
    """POST /call/<api_name> as any HTTP client would, and read its event stream: (event, error message)."""
    event, answer = call_events(page.url, api_name, json.dumps({"data": data}), timeout=60)
    return event, answer.get("error") if isinstance(answer, dict) else None


def queue_call(page: Page, fn_index: int, data: list[Any]) -> dict[str, Any]:
    """Run one of the page's own events as the browser does (queue join, then its stream): the final message."""
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    httpx.post(f"{page.url}gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    with httpx.stream("GET", f"{page.url}gradio_api/queue/data", params={"session_hash": session},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")


def queue_messages(url: str, fn_index: int, data: list[Any]) -> list[dict[str, Any]]:
    """Run a queued event as the browser does (queue join, then its stream): every message, to the last."""
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    messages = []
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                messages.append(json.loads(line[6:]))
                if messages[-1].get("msg") == "process_completed":
                    return messages
    raise AssertionError(f"the event never completed: {messages}")


def run_step(url: str, fn_index: int, data: list[Any]) -> list[Any]:
    """Run one of the page's cheap steps (queue=False) as the browser does, POST /run/predict: its outputs."""
    body = {"data": data, "fn_index": fn_index, "session_hash": uuid.uuid4().hex}
    r = httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


@contextlib.contextmanager
def served(demo: gr.Blocks) -> Iterator[tuple[str, dict[str, Any]]]:
    """`demo` served in this process: its URL and its config (GET /config, what the browser builds it from)."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield url, httpx.get(f"{url}config", timeout=30).json()
    finally:
        demo.close()


def events_named(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The events of function `name` in a served config (Gradio names repeats name, name_1, ...)."""
    return [d for d in config["dependencies"] if re.fullmatch(rf"{name}(_\d+)?", str(d["api_name"]))]


def test_before_after_pairs_the_target_with_the_first_result() -> None:
    assert ui.before_after("/t.png", [("/r1.png", "seed 1"), ("/r2.png", None)]) == ("/t.png", "/r1.png")
    assert ui.before_after("/t.png", [{"image": "/r1.png", "caption": None}]) == ("/t.png", "/r1.png")
    assert ui.before_after(None, [("/r1.png", "")]) is None and ui.before_after("/t.png", []) is None


def test_a_run_switches_its_controls_off_until_it_ends(page: Page) -> None:
    """A second click during a run started nothing, yet drew a new seed into the Seed box: the mode buttons and
    the mode choice are off from the run's start to its end, whether it succeeds or fails."""
    components = {c["id"]: c["props"] for c in page.config["components"]}
    controls = {"Generate", "Restyle", "Swap face", "Mode"}
    begins = events_named(page.config, "begin_run")
    assert len(begins) == 3
    for begin in begins:
        assert {components[i].get("label") or components[i].get("value") for i in begin["outputs"][-4:]} == controls
    done = queue_call(page, begins[0]["id"], [7, False, [], 0.4, 0.4, 0.4])
    off = done["output"]["data"]
    # ui.start_run's outputs as the page gets them (the cleared gallery comes as an empty one).
    assert off[:8] == [7, {}, [], None, None, None, None, ""] and ui.start_run(7, False, [], 0.4, 0.4, 0.4) == (
        7, {}, None, None, None, None, None, "")
    assert [u["interactive"] for u in off[8:]] == [False] * 4
    ends = events_named(page.config, "end_run")
    assert sorted((d["trigger_only_on_success"], d["trigger_only_on_failure"]) for d in ends) == (
        [(False, True)] * 3 + [(True, False)] * 3
    ), "back on after a success and after a failure (the page runs no .then step after a failed run)"
    runs = {d["id"]: d["api_name"] for d in page.config["dependencies"]}
    assert sorted(runs[d["trigger_after"]] for d in ends) == sorted(["generate", "restyle", "swap"] * 2)
    for end in ends:
        assert end["outputs"] == begins[0]["outputs"][-4:]
        assert [u["interactive"] for u in run_step(page.url, end["id"], [])] == [True] * 4


def test_the_mode_choice_relabels_the_photos_and_clears_the_last_mode_s_results(page: Page) -> None:
    """Restyle and Face swap showed "More photos and a pose reference" and a ControlNet label naming the pose
    photo; one mode's results stayed on screen in the next."""
    components = {c["id"]: c for c in page.config["components"]}
    (dep,) = events_named(page.config, "show_mode")
    kinds = [components[i]["type"] for i in dep["outputs"]]
    # It shows and hides the columns around a mode's own inputs, never an input: Gradio answers an update with a
    # new instance of the component for that session, without guard_input's checks (a face index of 150 got
    # Gradio's own "Value 150 is greater than maximum value 99." after a mode switch).
    events = page_events(page)
    inputs = {i for mode in ("generate", "restyle", "swap") for i in events[mode]["inputs"]}
    assert not inputs & set(dep["outputs"])
    assert kinds.count("column") >= 8
    photos, controls = kinds.index("accordion"), kinds.index("checkboxgroup")
    results = [n for n, i in enumerate(dep["outputs"]) if components[i]["props"].get("label") in
               ("Results", "Seed", "Identity similarity", "Face keypoints", "Timings (ms)")]
    summary, before_after = kinds.index("markdown"), kinds.index("imageslider")
    assert len(results) == 5
    for mode, photos_label, controls_label in (
        ("Restyle", "More photos of the same person", "Extra ControlNets (from the photo to restyle)"),
        ("Face swap", "More photos of the same person", None),
        ("Generate", "More photos and a pose reference", "Extra ControlNets (from the pose photo, or the face photo)"),
    ):
        updates = run_step(page.url, dep["id"], [mode])
        assert len(updates) == len(kinds)
        assert updates[photos]["label"] == photos_label
        assert updates[controls].get("label") == controls_label
        assert [updates[n] for n in results] == [[], None, None, None, None], "an empty gallery, no figures"
        assert updates[summary] == "" and updates[before_after]["value"] is None


def test_a_cached_example_says_it_comes_from_the_cache() -> None:
    """Served from the cache in 0.8 s, it said "Done in 10.8 s"."""
    line = ui.timings_line({"total_ms": 10800.0, "faces_ms": 31.0}, done=ui.EXAMPLE_DONE)
    assert line == "Example shown from the cache; first generated in 10.8 s: faces 31 ms"


def test_an_example_runs_in_its_click_event_once_then_comes_from_memory() -> None:
    """Gradio's lazy cache generated an example outside the click's event: its first click showed no progress."""
    calls: list[str] = []

    def counting(**kwargs: Any) -> Any:
        calls.append(kwargs["prompt"])
        yield Partial((gr.skip(),) * 4 + ({"progress": {"stage": "starting", "elapsed_s": 0.0}},))
        yield from fake_generate(**kwargs)

    rows = [{"face_image": FACE, "prompt": "a knight"}, {"face_image": FACE, "prompt": "a queen"}]
    demo = ui.build_demo({"generate": counting}, fake_status, settings=Settings(), examples={"generate": rows})
    with served(demo) as (url, config):
        (click,) = events_named(config, "run_example")
        # Queued like a run; its progress drawn by the page from its intermediate outputs, as a run's is.
        assert click["queue"] is not False and click["api_visibility"] == "private" and click["show_progress"] == (
            "hidden")
        assert calls == [], "nothing generated before a click"
        first = queue_messages(url, click["id"], [1])  # the browser sends the clicked example's number
        # Its progress (the intermediate outputs while it works) and its result both came in the click's own event.
        assert [m["msg"] for m in first if m["msg"] in ("process_generating", "process_completed")] == [
            "process_generating", "process_generating", "process_completed"]
        working = next(m for m in first if m["msg"] == "process_generating")["output"]["data"]
        assert working[4] == {"progress": {"stage": "starting", "elapsed_s": 0.0}}
        shown = first[-1]["output"]["data"]
        assert first[-1]["success"] and shown[-1].startswith("Done in") and calls == ["a queen"]
        again = queue_messages(url, click["id"], [1])[-1]["output"]["data"]
        assert again[-1].startswith(ui.EXAMPLE_DONE) and again[:5] == shown[:5] and calls == ["a queen"]


def test_status_tab_words(page: Page) -> None:
    """"ready — ready in 24.2 s", an empty header cell over the memory figures, a legend titled "series"."""
    ready = {"state": {"phase": "ready", "message": "ready in 24.2 s (cpu profile)"}}
    assert status_tab.format_load_state(ready) == "**Models:** ready in 24.2 s (cpu profile)"
    loading = status_tab.format_load_state({"state": {"phase": "loading", "progress": 0.5, "message": "base model"}})
    assert loading.startswith("**Models:** loading `") and loading.endswith("50 % — base model")
    header = status_tab.format_memory(REPORT).splitlines()[0]
    assert all(cell.strip() for cell in header.strip("|").split("|")), header
    (plot,) = [c["props"] for c in page.config["components"] if c["type"] == "nativeplot"]
    # No legend title ("series", then "Measure", said nothing): the entries name the series themselves.
    assert plot["color_title"] == "" and plot["title"] == "Memory over time"


# --- hints true for this server, refusals in the page's words ------------------------------------------


def test_the_page_s_hints_follow_the_server_s_profile(page: Page) -> None:
    """The speed hint said "quality: 30 steps" where the cpu profile runs 20; the image slider offered 4 where the
    profile makes 2. Both now come from the profile the status report names (the fake report's: cpu)."""
    cpu = hints.PageFacts.from_report(REPORT)
    assert cpu.steps == {"quality": 20, "fast": 8, "turbo": 4, "lcm": 5} and cpu.max_images == 2
    # Shares of quality's UNet passes: a guided step runs two, turbo's unguided one.
    assert cpu.speed_info() == ("quality: 20 steps; fast: 8 steps, ~40 % of the time; turbo: 4 steps, ~10 % of the "
                                "time, no negative prompt")
    large = hints.PageFacts.from_report({"profile": {"name": "large"}})
    assert large.steps["quality"] == 30 and large.max_images == 4 and "fast: 8 steps, ~27 %" in large.speed_info()
    unknown = hints.PageFacts.from_report({"state": {"phase": "error"}})  # a status that failed: the declaration's
    assert unknown.steps["quality"] == 30 and unknown.max_images == 4 and "profile" not in unknown.steps_info()
    props = {c["props"].get("label"): c["props"] for c in page.config["components"]}
    assert props["Number of images"]["maximum"] == 2
    assert props["Speed"]["info"] == cpu.speed_info()
    tabs = [c["props"]["label"] for c in page.config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Create", "Status"]


def test_refusals_on_the_page_name_the_fields_as_labelled() -> None:
    from instantid.declaration import labelled_sentence, params_for

    assert labelled_sentence(InvalidParameter("num_steps", 1000, "must be an integer in 0..100")) == (
        "Steps must be an integer in 0..100 (you gave 1000).")
    assert labelled_sentence(InvalidParameter("face_index", 150, "must be an integer in 0..99")) == (
        "Face to replace must be an integer in 0..99 (you gave 150).")
    assert labelled_sentence(InvalidParameter("controlnets[pose]", 3.0, "must be a number in 0..1.5")).startswith(
        "Pose strength must be")
    assert labelled_sentence(InvalidParameter("width/height", (512, 0), "set both or neither")).startswith(
        "Width and Height: set both or neither")

    names = list(params_for("generate"))

    def page_run(ranges: dict[str, tuple[float, float]], seed: Any = None, **values: Any) -> None:
        given = {name: api_default(name) for name in names} | {"face_image": {"path": FACE}} | values
        ui.page_check("generate", ranges)(seed, True, [], 0.4, 0.4, 0.4, *(given[name] for name in names))

    page_run({})  # the defaults pass
    for values, ranges, sentence in (
        ({"num_steps": 1000}, {"num_steps": (0, 100)}, "Steps must be an integer in 0..100 (you gave 1000)."),
        ({"num_images": 3}, {"num_images": (1, 2)}, "Number of images must be an integer in 1..2 (you gave 3)."),
        ({"num_steps": 60, "enable_lcm": True}, {}, "Steps: use 1..50 with LCM fast mode"),
        ({"width": 512}, {}, "Width and Height: set both or neither"),
        ({"face_image": None}, {}, "No face photo: add a photo of the person's face."),
    ):
        with pytest.raises(gr.Error) as refused:
            page_run(ranges, **values)
        assert refused.value.message.startswith(sentence) and "num_steps" not in refused.value.message, refused.value
    with pytest.raises(gr.Error) as refused:
        page_run({}, seed=-5)
    assert refused.value.message == "Seed must be an integer in 0..2147483647 (you gave -5)."
    # Framing and head angle: a value no choice offers, and a framing with extra ControlNets ticked.
    with pytest.raises(gr.Error) as refused:
        page_run({}, framing="close-up")
    assert refused.value.message == ("Framing: choose one of photo, portrait, half body, full body (you gave "
                                     "close-up).")
    given = {name: api_default(name) for name in names} | {"face_image": {"path": FACE}, "framing": "full body"}
    with pytest.raises(gr.Error) as refused:
        ui.page_check("generate", {})(None, True, ["canny"], 0.4, 0.4, 0.4, *(given[name] for name in names))
    assert refused.value.message.startswith("Extra ControlNets must come from a photo's layout, which framing and "
                                            "head angle replace: add a pose photo"), refused.value.message


def api_default(name: str) -> Any:
    from instantid.declaration import PARAMS

    return PARAMS[name].default


def test_the_gpu_time_table_shows_the_last_ten_requests() -> None:
    recent = [{"mode": "generate", "steps": k, "images": 1, "megapixels": 1.0, "asked_s": 30, "basis": "prior",
               "used_s": 10.0, "gpu_function_s": 9.0} for k in range(1, 21)]
    text = status_tab.format_durations({"durations": {"basis": "prior", "factor": 1.0, "cap_s": 120, "recent": recent}})
    rows = [line for line in text.splitlines() if line.startswith("| generate |")]
    assert [int(row.split("|")[2]) for row in rows] == list(range(20, 10, -1))  # newest first, ten of them
    assert "last 10 requests" in text


# --- framing and head angle: one block under the prompt, with a preview of the face layout -------------------


def _layout_children(node: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every node of a served layout tree with its children."""
    children = node.get("children", [])
    yield node, children
    for child in children:
        yield from _layout_children(child)


def test_framing_and_head_angle_sit_together_right_under_the_prompt(page: Page) -> None:
    """One block for both (and their preview), next after the prompt; shown in Generate and Group, hidden in
    Restyle and Face swap, as a block: the mode choice updates its column, never the inputs."""
    modes = ["generate", "restyle", "swap", "group"]
    assert ui.visible_in("generate", modes)["composition"] and ui.visible_in("group", modes)["composition"]
    assert not ui.visible_in("restyle", modes)["composition"] and not ui.visible_in("swap", modes)["composition"]
    assert not {"framing", "head_angle"} & set(ui.visible_in("generate", modes)), "two blocks, or an input updated"
    components = {c["id"]: c for c in page.config["components"]}
    by_elem = {c["props"].get("elem_id"): i for i, c in components.items() if c["props"].get("elem_id")}
    by_label = {c["props"].get("label"): i for i, c in components.items() if c["props"].get("label")}


    def holds(node: dict[str, Any], target: int) -> bool:
        return any(n["id"] == target for n, _ in _layout_children(node))

    # The block before it holds the prompt (Gradio wraps form inputs in a "form" node).
    siblings = next(children for _, children in _layout_children(page.config["layout"])
                    if by_elem["composition"] in [child["id"] for child in children])
    at = [child["id"] for child in siblings].index(by_elem["composition"])
    block = siblings[at]
    assert holds(siblings[at - 1], by_elem["prompt"])
    inside = [node["id"] for node, _ in _layout_children(block)]
    assert [components[by_label[label]]["type"] for label in ("Framing", "Head angle")] == ["radio", "dropdown"]
    assert inside.index(by_label["Framing"]) < inside.index(by_label["Head angle"]) < inside.index(
        by_elem["layout-preview"])
    assert components[by_elem["layout-preview"]]["props"]["visible"] is False
    # Their hints fit one line on a phone.
    assert all(len(components[by_label[label]]["props"]["info"]) <= 40 for label in ("Framing", "Head angle"))
    (show_mode,) = events_named(page.config, "show_mode")
    assert by_elem["composition"] in show_mode["outputs"]
    assert not {by_label["Framing"], by_label["Head angle"]} & set(show_mode["outputs"])


def test_the_layout_preview_is_a_cheap_step_of_the_page_only(page: Page) -> None:
    """Redrawn outside the queue and the API at each change of what it reads (the mode, framing, head angle, size,
    pose photo); it shows the model face's drawing only when a framing or head angle places the face."""
    components = {c["id"]: c for c in page.config["components"]}
    steps = events_named(page.config, "show_layout")
    previews = [d for d in steps if any(components[i]["props"].get("elem_id") == "layout-preview-image"
                                        for i in d["outputs"])]
    labels = {components[d["targets"][0][0]]["props"].get("label") for d in previews}
    assert {"Mode", "Framing", "Head angle", "Width", "Height", "Pose photo (optional)"} <= labels
    assert all(d["queue"] is False and d["api_visibility"] == "private" for d in previews)
    inputs = previews[0]["inputs"]
    values = {components[i]["props"].get("label"): components[i]["props"].get("value") for i in inputs}
    data = [values[components[i]["props"].get("label")] for i in inputs]
    framing_at = [components[i]["props"].get("label") for i in inputs].index("Framing")
    box, image, caption = run_step(page.url, previews[0]["id"], data)
    assert box["visible"] is False and image is None and caption == ""
    data[framing_at] = "full body"
    box, image, caption = run_step(page.url, previews[0]["id"], data)
    assert box["visible"] is True and image["url"].endswith(".png")
    # The fake status report's profile is cpu: its 512 short side gives full body's 832 x 1216 at half size.
    assert caption.startswith("Face layout of this run (full body, 448x640), shown on a model face")
    assert "your photo's own face proportions replace the model face's" in caption
    box, image, caption = run_step(page.url, previews[0]["id"], ["Restyle", *data[1:]])
    assert box["visible"] is False and image is None


def test_layout_preview_follows_the_framing_the_angle_the_size_and_the_photos() -> None:
    from instantid.frontends.hints import layout_preview

    def shown(mode: str, **values: Any) -> tuple[bool, Any, str]:
        box, image, caption = layout_preview(mode, values, 1024, 1280)
        return box["visible"], image, caption

    photo = {"path": "/tmp/x.png"}  # as the page sends an upload: only whether it is there counts
    assert not shown("generate")[0] and not shown("generate", framing="photo", head_angle="photo")[0]
    assert not shown("generate", framing="full body", pose_image=photo)[0], "the pose photo sets the layout"
    assert not shown("group", framing="full body", layout_image=photo)[0], "the layout photo sets it"
    assert not shown("restyle", framing="full body")[0] and not shown("swap", head_angle="left")[0]
    assert shown("generate", framing="full body", layout_image=photo)[0], "Generate takes no layout photo"
    visible, image, caption = shown("generate", framing="full body")
    assert visible and image.size == (160, 234) and "(full body, 832x1216)" in caption
    visible, image, caption = shown("generate", head_angle="left")
    assert image.size == (160, 160) and "(head angle left, 1024x1024)" in caption
    assert caption.endswith("The face keeps the place and size it has in your photo.")
    # The size asked (both sides) replaces the framing's canvas; a side being typed does not.
    assert "(portrait, 512x768)" in shown("generate", framing="portrait", width=512, height=768)[2]
    assert "(portrait, 1024x1024)" in shown("generate", framing="portrait", width="5x", height=768)[2]
    # A group: side by side on its own canvas, as many people as the last slot filled (two at least).
    _, image, caption = shown("group", framing="half body", head_angle="up", person_1=[photo], person_3=[photo])
    assert "(half body, head angle up, 3 people, 1280x832)" in caption and image.size == (160, 104)
    assert "each person's own face proportions" in caption


def test_the_model_layout_draws_the_keypoints_where_the_framing_puts_them() -> None:
    """Unshrunk, the preview is the run's drawing for the canonical face: each keypoint's circle centred where
    `framing.frame` puts it, a group's faces in their slots."""
    from instantid.vision import framing, geometry

    def centres(image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB"))
        return np.array([np.argwhere(np.all(pixels == colour, axis=-1)).mean(axis=0)[::-1]
                         for colour in geometry.KPS_COLORS])

    canvas = (832, 1216)
    turned = framing.turned(framing.CANONICAL_FACE[:, :2], framing.CANONICAL_BOX, -30.0, 0.0)
    expected, _ = framing.frame(*turned, canvas, "full body")
    drawing = framing.model_layout("full body", "left", canvas, width=832)
    assert drawing.size == canvas and np.abs(centres(drawing) - expected).max() < 1.5
    # Shrunk for the page: the same picture, smaller.
    assert framing.model_layout("full body", "left", canvas).size == (160, 234)
    # Two people of a group side by side: one face in each half.
    pair = np.asarray(framing.model_layout("portrait", "photo", (1280, 832), people=2, width=1280))
    lit = np.argwhere(pair.sum(axis=-1) > 0)[:, 1]
    assert lit.min() < 640 < lit.max() and not np.any(pair[:, 630:650].sum(axis=-1) > 0)


def test_the_estimate_says_what_a_full_body_framing_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full body's small face is refined by default: one more render, which the line beside the button names
    (on the tiny preset the seconds alone round to the same figure)."""
    from types import SimpleNamespace

    from instantid.request import durations

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(durations, "RECORD", durations.Record())
    monkeypatch.setattr(api, "_profile", lambda: (SimpleNamespace(default_steps=None, max_images=4), 1024))
    shape = durations.Shape(steps=30, images=1, megapixels=1.0, guided=True)
    durations.RECORD.observe(0, shape, {"denoise_ms": 9000.0, "decode_ms": 300.0, "gpu_ms": 9500.0}, wall_s=10.0)
    photo, full = (api.estimate("generate", {"framing": f}) for f in ("photo", "full body"))
    assert photo.endswith("from the runs so far.") and "refined" not in photo
    assert full.endswith("from the runs so far. Includes 1 refined face (one more render).")
    two = api.estimate("generate", {"framing": "full body", "num_images": 2})
    assert two.endswith("Includes 2 refined faces (one more render each).")
    posed = api.estimate("generate", {"framing": "full body", "pose_image": {"path": "/tmp/x.png"}})
    assert "refined" not in posed, "a pose photo sets the layout: no framing, nothing refined"


def test_api_only_angles_are_not_given_by_default(page: Page) -> None:
    """head_yaw and head_pitch (API only, hidden on the page) were hidden sliders, which Gradio starts at their
    minimum: every run from the page (and every gradio_client call leaving them out) asked for a head turned -45
    degrees and lowered -30, and a head angle chosen on the page was refused as given together with them."""
    params = {p["parameter_name"]: p for p in page.api["/generate"]["parameters"]}
    for name in ("head_yaw", "head_pitch"):
        assert params[name]["parameter_has_default"] and params[name]["parameter_default"] is None, params[name]
        (component,) = [c for c in page.config["components"] if c["props"].get("label") == name]
        assert component["props"].get("value") is None and component["props"]["visible"] is False
