"""The app under an emulated ZeroGPU: the real `spaces` package, its device API answered by a stub.

`tests/zerogpu_app.py` runs `app.py` with SPACES_ZERO_GPU=true on the CPU build of torch; this test serves
the device API `spaces` talks to (start-up report, schedule, allow, release) on 127.0.0.1 and records each
call, then drives the app with a real `gradio_client`.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from tests.apprunner import App, start_app

STOPPED = "generation stopped: the client cancelled or disconnected"  # logged by instantid.frontends.api


class DeviceAPI:
    """A stub of ZeroGPU's device API: grants every schedule at once and remembers the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                url = urlparse(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query).items()}
                api.calls.append((url.path, params))
                body = b""
                if url.path == "/schedule":
                    n = sum(1 for path, _ in api.calls if path == "/schedule")
                    grant = {"idle": False, "nvidiaIndex": 0, "nvidiaUUID": "GPU-stub", "allowToken": f"token-{n}"}
                    body = json.dumps(grant).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [path for path, _ in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def zerogpu(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[tuple[App, DeviceAPI, dict]]:
    tmp = tmp_path_factory.mktemp("zerogpu")
    # One optional part broken on purpose: a damaged pose ControlNet must not stop start-up.
    cache = tmp / "hub"
    shutil.copytree(tiny_cache, cache)
    for weights in (cache / "models--instantid-tiny--controlnet-pose").rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    device = DeviceAPI()
    cgroup = tmp / "cgroup"
    cgroup.write_text("1:devices:/zerogpu-test\n")
    facts = tmp / "facts.json"
    slow = tmp / "slow-step-seconds"
    app = start_app(
        tmp,
        cache,
        script="tests/zerogpu_app.py",
        SPACES_ZERO_GPU="true",
        SPACES_ZERO_DEVICE_API_URL=device.url,
        ZEROGPU_PROC_SELF_CGROUP_PATH=str(cgroup),
        ZEROGPU_OFFLOAD_DIR=str(tmp / "offload"),
        ZEROGPU_FACTS=str(facts),
        ZEROGPU_SLOW_STEP_FILE=str(slow),
    )
    try:
        yield app, device, {**json.loads(facts.read_text()), "slow_step_file": str(slow)}
    finally:
        app.stop()
        device.close()


def test_everything_is_resident_before_launch(zerogpu: tuple[App, DeviceAPI, dict]) -> None:
    app, device, facts = zerogpu
    assert facts["thread"] == "MainThread" and not facts["background_thread"], facts
    assert facts["resident"] and facts["state"]["phase"] == "ready", facts["state"]
    assert facts["has_lcm"] and set(facts["unavailable"]) == {"pose"}, facts
    assert "pose ControlNet could not be loaded" in facts["unavailable"]["pose"]
    expected = {"unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "resampler", "controlnet_canny",
                "controlnet_depth", "depth_model"}
    assert set(facts["modules"]) == expected
    assert all(devices == ["cuda:0"] for devices in facts["modules"].values()), facts["modules"]
    assert facts["cuda_tensors"] > 0
    assert device.paths()[:1] == ["/startup-report"], "spaces reports start-up once it has packed"


# A generation of 4 guided steps at 128x128 (the durations tests' unit of work).
SMALL = {"num_steps": 4, "width": 128, "height": 128, "guidance_scale": 5.0, "seed": 1}


def _asked(client, device: DeviceAPI, api_name: str = "/generate", **kw: object) -> tuple[int, Any]:
    """One request: the seconds spaces asked the device API for (its one schedule call), and the outputs."""
    before = len(device.calls)
    outputs = client.predict(api_name=api_name, **kw)
    (schedule,) = [params for path, params in device.calls[before:] if path == "/schedule"]
    return int(schedule["durationSeconds"]), outputs


def _section(client) -> dict:
    return client.predict(api_name="/status")["durations"]


def test_durations_start_from_the_prior_then_follow_what_the_worker_measured(
    zerogpu: tuple[App, DeviceAPI, dict], photos
) -> None:
    """The first GPU call (a default request: quality speed, the automatic size) asks the prior, within the cap;
    the next asks what the first used x the margin; the timings report what was asked and used. Runs first in
    this module: the app's record must not have seen a GPU call yet. (Later 30-step calls are priced from this
    CPU worker's figures, over the cap: the test below.)"""
    from gradio_client import Client, handle_file

    from instantid.request import durations

    app, device, facts = zerogpu
    assert device.paths().count("/schedule") == 0, "must run before any other GPU call of this module"
    client = Client(app.url, verbose=False)
    face = handle_file(str(photos["astronaut"]))
    shape = durations.Shape(steps=4, images=1, megapixels=128 * 128 / 2**20, guided=True)

    def run(**kw: object) -> int:
        return _asked(client, device, face_image=face, prompt="x", **{**SMALL, **kw})[0]

    factor = _section(client)["factor"]  # no NVIDIA driver here: spaces takes its first entry (H200, 1.0)

    def expected(figures: durations.Figures | None, of: durations.Shape = shape) -> int:
        return durations.asked_after_factor(durations.ask_seconds(of, figures, factor), factor)

    first, (*_, timings) = _asked(client, device, face_image=face, prompt="x", seed=1)
    default = durations.Shape(steps=30, images=1, megapixels=shape.megapixels, guided=True)  # the tiny 128x128
    assert first == expected(None, default) == durations.PRIOR_MIN_S <= durations.MAX_DURATION_S, "the prior"
    assert timings["gpu_asked_ms"] == first * 1000 and timings["gpu_used_ms"] > 0, "the timings: asked and used"
    report = _section(client)
    observed = durations.Figures(**report["observed"])
    assert report["basis"] == "observed" and observed.step_s > 0 and observed.fixed_s > 0
    (row,) = report["recent"]
    assert (row["asked_s"], row["basis"]) == (first, "prior") and 0 < row["gpu_function_s"] <= row["used_s"]
    assert row["used_s"] == pytest.approx(timings["gpu_used_ms"] / 1000, abs=0.01)

    second = run()
    assert second == expected(observed), "the second call asks from the figures the first one measured"
    report = _section(client)
    assert [r["basis"] for r in report["recent"]] == ["prior", "observed"]
    assert report["recent"][-1]["asked_s"] == second


def test_a_slow_worker_raises_the_next_ask_and_a_call_over_the_cap_is_refused(
    zerogpu: tuple[App, DeviceAPI, dict], photos
) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from instantid.request import durations

    app, device, facts = zerogpu
    client = Client(app.url, verbose=False)
    face = handle_file(str(photos["astronaut"]))

    def run(**kw: object) -> int:
        return _asked(client, device, face_image=face, prompt="x", **{**SMALL, **kw})[0]

    slow_file = Path(facts["slow_step_file"])
    slow_file.write_text("4")  # each step of the next call 4 s longer
    try:
        before_slow = run()
    finally:
        slow_file.unlink()
    slow_row = _section(client)["recent"][-1]
    assert slow_row["denoise_s"] >= 16, "the slow worker's 4 steps took 16 s more"
    after_slow = run()
    assert after_slow > before_slow, (before_slow, after_slow)
    assert after_slow >= durations.MARGIN * slow_row["used_s"] - 0.01, "at least what the slow call used x the margin"

    # 24 steps priced by the slow call's figures: over the cap. The old code asked for the cap (ZeroGPU would cut
    # the call off there, after spending the visitor's quota); now nothing is scheduled.
    section = _section(client)
    big = durations.Shape(steps=24, images=1, megapixels=128 * 128 / 2**20, guided=True)
    refusal = durations.over_cap(big, durations.Figures(**section["observed"]), section["factor"], section["cap_s"])
    assert refusal is not None and refusal.startswith("This request needs about ")
    schedules = device.paths().count("/schedule")
    with pytest.raises(AppError) as refused:
        run(num_steps=24)
    assert str(refused.value) == refusal, "the sentence priced from the same figures as the ask"
    assert device.paths().count("/schedule") == schedules, "no GPU time was asked"
    assert run() <= durations.MAX_DURATION_S, "the app serves the next request"


def test_the_largest_group_is_refused_before_any_gpu_time(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    """The issue's case: four people, 4 images at 1280x1280, quality speed. Refused in one sentence that offers
    only changes that fit, with no schedule call; the Status tab's row names the mode, the people and the images."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from instantid.request import durations

    app, device, _ = zerogpu
    client = Client(app.url, verbose=False)
    people = {f"person_{k}": [handle_file(str(photos[name]))]
              for k, name in enumerate(("astronaut", "hanks", "astronaut_flipped", "group"), start=1)}
    before = len(device.calls)
    with pytest.raises(AppError) as refused:
        client.predict(prompt="x", num_images=4, width=1280, height=1280, api_name="/group", **people)
    assert "/schedule" not in [path for path, _ in device.calls[before:]], "no GPU time was asked"
    sentence = str(refused.value)
    found = re.fullmatch(r"This request needs about (\d+) s of GPU, more than the (\d+) s one ZeroGPU call may take "
                         r"here: use (.+)\.", sentence)
    assert found and int(found[1]) > int(found[2]) == durations.MAX_DURATION_S, sentence
    offered = re.findall(r"\(about (\d+) s\)", found[3])
    assert offered and all(int(s) <= durations.MAX_DURATION_S for s in offered), sentence
    row = _section(client)["recent"][-1]
    assert (row["request"], row["people"], row["images"], row["asked_s"]) == ("group, 4 people", 4, 4, None), row
    assert row["basis"].startswith("refused") and row["needed_s"] == int(found[1])


def test_a_photo_without_a_face_costs_no_gpu_time(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    app, device, _ = zerogpu
    before = device.paths().count("/schedule")
    client = Client(app.url, verbose=False)
    with pytest.raises(AppError, match="No face found"):
        client.predict(face_image=handle_file(str(photos["noface"])), prompt="x", api_name="/generate")
    assert device.paths().count("/schedule") == before


def test_an_unavailable_part_is_refused_with_its_reason(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    app, device, _ = zerogpu
    before = device.paths().count("/schedule")
    with pytest.raises(AppError, match="pose ControlNet is not available on this server.*untick 'pose'"):
        Client(app.url, verbose=False).predict(face_image=handle_file(str(photos["astronaut"])), prompt="x",
                                               controlnets=["pose"], api_name="/generate")
    assert device.paths().count("/schedule") == before


def test_generation_runs_in_the_zerogpu_worker(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    from gradio_client import Client, handle_file

    from instantid.request import durations

    app, device, _ = zerogpu
    client = Client(app.url, verbose=False)
    before = len(device.calls)
    gallery, seed, sims, keypoints, timings = client.predict(
        face_image=handle_file(str(photos["astronaut"])), prompt="an astronaut", num_steps=3, seed=7,
        controlnets=["canny", "depth"], enable_lcm=True, api_name="/generate",
    )
    assert seed == 7 and len(gallery) == 1 and Path(gallery[0]["image"]).is_file()
    calls = device.calls[before:]
    assert [path for path, _ in calls] == ["/schedule", "/allow", "/release"], calls
    schedule = calls[0][1]
    assert durations.OBSERVED_MIN_S <= int(schedule["durationSeconds"]) <= durations.MAX_DURATION_S, schedule
    assert calls[2][1]["fail"] == "false", "the worker returned a result"
    assert "denoise_ms" in timings, "the denoising ran in the worker and its timings came back"


def test_swap_and_restyle_run_in_the_worker_and_a_faceless_target_costs_nothing(
    zerogpu: tuple[App, DeviceAPI, dict], photos
) -> None:
    """The swap's job crosses into the worker without its target photo; the paste-back runs in the main process."""
    import numpy as np
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    app, device, _ = zerogpu
    client = Client(app.url, verbose=False)
    before = len(device.calls)
    face, target = handle_file(str(photos["astronaut"])), handle_file(str(photos["group"]))
    gallery, _, _, _, timings = client.predict(face, target, "a portrait", num_steps=2, seed=3, api_name="/swap")
    calls = device.calls[before:]
    assert [path for path, _ in calls] == ["/schedule", "/allow", "/release"], calls
    assert calls[2][1]["fail"] == "false" and "denoise_ms" in timings and "paste_ms" in timings
    with Image.open(gallery[0]["image"]) as out, Image.open(photos["group"]) as original:
        changed = np.any(np.asarray(out.convert("RGB")) != np.asarray(original.convert("RGB")), axis=-1)
    assert 0 < changed.mean() < 0.05
    gallery, *_ = client.predict(face, handle_file(str(photos["hanks"])), "a painting", strength=0.5, num_steps=2,
                                 api_name="/restyle")
    assert Path(gallery[0]["image"]).is_file()
    before = device.paths().count("/schedule")
    with pytest.raises(AppError, match="No face found in the photo to swap a face into"):
        client.predict(face, handle_file(str(photos["noface"])), "x", api_name="/swap")
    assert device.paths().count("/schedule") == before


def test_errors_in_the_worker_reach_the_visitor(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    """An out-of-range value is refused before scheduling; an error inside the worker keeps its message."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    app, device, _ = zerogpu
    client = Client(app.url, verbose=False)
    before = device.paths().count("/schedule")
    with pytest.raises(AppError, match="num_steps"):
        client.predict(face_image=handle_file(str(photos["astronaut"])), prompt="x", num_steps=500,
                       api_name="/generate")
    assert device.paths().count("/schedule") == before


def test_status_reports_the_resident_start_up(zerogpu: tuple[App, DeviceAPI, dict]) -> None:
    from gradio_client import Client

    app, _, _ = zerogpu
    report = Client(app.url, verbose=False).predict(api_name="/status")
    assert report["startup"]["mode"] == "resident" and set(report["startup"]["unavailable"]) == {"pose"}
    names = {c["name"] for c in report["components"]}
    assert {"lcm_lora", "controlnet_canny", "controlnet_depth", "depth_model"} <= names
    assert all(c["device"].startswith("cuda") for c in report["components"]), report["components"]
    roles = {c["role"]: c for c in report["checkpoints"]}
    assert roles["IdentityNet"]["repo"] == "instantid-tiny/InstantID" and roles["LCM-LoRA"]["weights"]
    assert report["gpu"]["emulated"] is True


def test_progress_from_the_worker_reaches_the_client(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    from gradio_client import Client, handle_file

    app, _, _ = zerogpu
    job = Client(app.url, verbose=False).submit(
        face_image=handle_file(str(photos["astronaut"])), prompt="x", num_steps=4, seed=1, api_name="/generate"
    )
    job.result(timeout=120)
    updates = []
    while not job.communicator.updates.empty():
        updates.append(job.communicator.updates.get_nowait())
    steps = [(u.progress_data[-1].index, u.progress_data[-1].length) for u in updates
             if getattr(u, "progress_data", None) and u.progress_data[-1].desc == "Denoising"]
    assert (4, 4) in steps, steps
    # The live previews cross the worker inside its Steps (pickled), like the progress: shown before the result.
    *working, final = job.outputs()
    captions = [out[0][0]["caption"] for out in working if isinstance(out[0], list)]
    assert captions == [f"preview, step {i} of 4" for i in (1, 2, 3)], captions
    assert final[0][0]["caption"].startswith("seed 1")


def test_cancel_frees_the_gpu_within_steps(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    """A visitor who cancels: `spaces` stops the worker at its next step and the GPU is released. The long job is
    a small one on a slow worker (1 s more a step): a large one would now be refused as over the cap."""
    from gradio_client import Client, handle_file

    app, device, facts = zerogpu
    client = Client(app.url, verbose=False)
    releases = device.paths().count("/release")
    slow_file = Path(facts["slow_step_file"])
    slow_file.write_text("1")
    try:
        job = client.submit(face_image=handle_file(str(photos["astronaut"])), prompt="x", num_steps=30, width=64,
                            height=64, api_name="/generate")
        seen: dict[int, float] = {}  # step -> when the client first saw it
        deadline = time.monotonic() + 120
        while len(seen) < 3:
            assert time.monotonic() < deadline, f"the long job reported too few steps: {seen}, {job.status()}"
            progress = job.status().progress_data
            if progress and progress[-1].desc == "Denoising" and progress[-1].index:
                seen.setdefault(progress[-1].index, time.monotonic())
            time.sleep(0.02)
        steps = sorted(seen)
        step_s = (seen[steps[-1]] - seen[steps[0]]) / (steps[-1] - steps[0])
        cancelled = time.monotonic()
        assert job.cancel()
    finally:
        slow_file.unlink()
    while device.paths().count("/release") == releases:
        assert time.monotonic() - cancelled < 120, "the GPU was never released after the cancel"
        time.sleep(0.02)
    stopped_after = time.monotonic() - cancelled
    # spaces releases the GPU while the generator is being closed; our log line follows once it is closed.
    while STOPPED not in app.log_text():
        assert time.monotonic() - cancelled < stopped_after + 10, "the cancel was never logged"
        time.sleep(0.05)
    assert stopped_after < 3 * step_s + 2, (
        f"released {stopped_after:.1f} s after the cancel, at {step_s:.2f} s a step: more than two steps ran on"
    )
    assert steps[-1] + stopped_after / step_s < 15, "far from the 30 steps the job asked for"
    gallery, *_ = client.predict(face_image=handle_file(str(photos["astronaut"])), prompt="x", num_steps=2,
                                 api_name="/generate")
    assert len(gallery) == 1, "the app serves the next request"


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.mark.browser
def test_the_page_shows_the_gpu_seconds_beside_the_button(zerogpu: tuple[App, DeviceAPI, dict], photos) -> None:
    """In a real Chromium: beside each mode's run button, the GPU seconds its settings will ask (or why they
    would be refused), redrawn when the images, the speed or the people change; asking for nothing."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    expect = sync_api.expect
    app, device, _ = zerogpu
    schedules = device.paths().count("/schedule")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(app.url, wait_until="domcontentloaded")
            button, estimate = page.locator("#generate-button"), page.locator("#generate-estimate")
            expect(estimate).to_contain_text(re.compile(r"GPU time \(1 image, speed quality\): .*\d+ s"),
                                             timeout=60_000)
            below, under = button.bounding_box(), estimate.bounding_box()
            assert below and under and 0 <= under["y"] - (below["y"] + below["height"]) < 40, (below, under)
            images = page.get_by_role("spinbutton", name="Number of images")
            images.fill("3")
            images.press("Enter")
            expect(estimate).to_contain_text("(3 images, speed quality)", timeout=10_000)
            page.get_by_label("turbo", exact=True).check()
            expect(estimate).to_contain_text("(3 images, speed turbo)", timeout=10_000)

            page.get_by_label("Group", exact=True).check()
            group = page.locator("#group-estimate")
            expect(group).to_contain_text("(2 people, 3 images, speed turbo)", timeout=10_000)
            expect(estimate).to_be_hidden()
            page.get_by_text("More people and a layout photo").click()
            slot = page.locator(".block", has_text="Person 3: photo(s)").locator("input[type=file]").first
            slot.set_input_files(str(photos["hanks"]))
            expect(group).to_contain_text("(3 people, 3 images, speed turbo)", timeout=30_000)
            assert not errors, errors
        finally:
            browser.close()
    assert device.paths().count("/schedule") == schedules, "an estimate asks ZeroGPU for nothing"
