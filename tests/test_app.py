"""The real app (`python app.py`) under the tiny preset, driven over HTTP by gradio_client.

Tiny models (written to a per-session cache on first use) and real face models: every code path from
the HTTP request to the pipeline and back runs, offline, in seconds per request on a CPU.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from instantid.declaration import MAX_SEED
from instantid.frontends.gradio_adapter import MAX_PARKED_UPLOAD_LIMITS, MAX_PARKED_UPLOADS, PARTIAL_PREFIX, UploadGuard
from tests import apprunner

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "assets" / "astronaut.jpg"
# Two steps keep each tiny-preset request well under a second of denoising on two cores.
FAST = {"num_steps": 2}


@pytest.fixture(scope="module")
def app(tiny_app: apprunner.App) -> Iterator[tuple[str, Path]]:
    yield tiny_app.url, tiny_app.log  # the session's app (conftest), shared with the browser and hardening tests


@pytest.fixture(scope="module")
def client(app: tuple[str, Path]) -> Client:
    return Client(app[0], verbose=False)


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_api_signature(client: Client) -> None:
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(info) == {"/generate", "/restyle", "/swap", "/group", "/status"}
    params = [p["parameter_name"] for p in info["/generate"]["parameters"]]
    assert params[:2] == ["face_image", "prompt"] and "randomize_seed" in params and "controlnets" in params
    required = [p["parameter_name"] for p in info["/generate"]["parameters"] if not p["parameter_has_default"]]
    assert required == ["face_image", "prompt"]


def test_restyle_and_swap_signatures(client: Client) -> None:
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for endpoint, own in (("/restyle", ["source_image", "strength"]), ("/swap", ["target_image", "face_index"])):
        params = {p["parameter_name"]: p for p in info[endpoint]["parameters"]}
        required = [name for name, p in params.items() if not p["parameter_has_default"]]
        assert required == ["face_image", own[0], "prompt"] and own[1] in params
        assert "pose_image" not in params
    assert "width" not in [p["parameter_name"] for p in info["/swap"]["parameters"]]


def test_view_api_tells_the_types_the_server_checks(client: Client) -> None:
    """Whole numbers are int (a slider alone says float), photos are uploads (an image alone says "or URL")."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for endpoint in ("/generate", "/restyle", "/swap"):
        params = {p["parameter_name"]: p for p in info[endpoint]["parameters"]}
        for name in ("num_images", "num_steps", "seed", *(["face_index"] if endpoint == "/swap" else [])):
            assert params[name]["python_type"]["type"] == "int", (endpoint, name, params[name]["python_type"])
        assert params["guidance_scale"]["python_type"]["type"] == "float"
        photos = [p for p in params.values() if p["component"] in ("Image", "File")]
        assert len(photos) >= 2
        for photo in photos:
            assert "handle_file" in photo["python_type"]["description"], photo
            assert "publicly available" not in str(photo).lower(), photo


def test_a_keyword_of_another_mode_is_named(client: Client) -> None:
    """gradio_client refuses it itself before sending (its TypeError names it); the endpoint function, as MCP or a
    script calls it, says which modes take it."""
    from instantid.frontends import api

    with pytest.raises(TypeError, match="`width`"):
        client.predict(handle_file(str(FACE)), handle_file(str(FACE)), "x", width=128, api_name="/swap")
    with pytest.raises(gr.Error, match=re.escape("width=128: is not used by swap (only by generate, restyle, group)")):
        next(api.swap(str(FACE), str(FACE), "x", width=128))


def test_a_plain_string_as_a_photo_gets_a_sentence(client: Client, photos: dict[str, Path]) -> None:
    for args, name in (((str(FACE), "x"), "face_image"),
                       ((handle_file(str(FACE)), "x", [str(FACE)]), "extra_face_images")):
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name="/generate", **FAST)
        message = str(caught.value)
        assert f"Invalid {name}" in message and "handle_file(path)" in message, message
        assert "validation error" not in message.lower() and "pydantic" not in message.lower(), message
    with pytest.raises(AppError, match="Invalid target_image: send the photo itself as an upload"):
        client.predict(handle_file(str(FACE)), str(photos["group"]), "x", api_name="/swap", **FAST)


def test_swap_round_trip_keeps_the_target_outside_the_face(client: Client, photos: dict[str, Path]) -> None:
    def run(seed: int) -> np.ndarray:
        gallery, used, _, keypoints, timings = client.predict(
            handle_file(str(FACE)), handle_file(str(photos["group"])), "a portrait", face_index=1, seed=seed,
            api_name="/swap", **FAST,
        )
        assert used == seed and "paste_ms" in timings
        return pixels(gallery[0]["image"])

    target = pixels(str(photos["group"]))
    first = run(5)
    assert first.shape == target.shape  # the whole target photo, in a lossless PNG
    changed = np.any(first != target, axis=-1)
    assert 0 < changed.mean() < 0.05, changed.mean()  # one face of six, redrawn; nothing else
    assert np.array_equal(first, run(5))
    with pytest.raises(AppError, match="No face found in the photo to swap a face into"):
        client.predict(handle_file(str(FACE)), handle_file(str(photos["noface"])), "x", api_name="/swap", **FAST)
    with pytest.raises(AppError, match="face_index=9"):
        client.predict(handle_file(str(FACE)), handle_file(str(photos["group"])), "x", face_index=9,
                       api_name="/swap", **FAST)


def test_group_round_trip_scores_each_person(client: Client, photos: dict[str, Path]) -> None:
    hopper, pair = (str(ROOT / "assets" / name) for name in ("grace_hopper.jpg", "two_people.jpg"))
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/group"]["parameters"]
    assert [p["parameter_name"] for p in info][:6] == ["person_1", "person_2", "prompt", "person_3", "person_4",
                                                        "names"]
    assert [p["parameter_name"] for p in info if not p["parameter_has_default"]] == ["person_1", "person_2", "prompt"]
    gallery, seed, similarities, keypoints, timings = client.predict(
        person_1=[handle_file(str(FACE))], person_2=[handle_file(hopper), handle_file(str(FACE))],
        names="Ada, Ben", layout_image=handle_file(pair), prompt="two friends", seed=3, api_name="/group", **FAST,
    )
    assert seed == 3 and len(gallery) == 1 and pixels(gallery[0]["image"]).shape == pixels(keypoints).shape
    assert similarities == [{"Ada": None, "Ben": None}]  # the tiny models paint no face; per person nonetheless
    assert gallery[0]["caption"] == "seed 3: Ada no face, Ben no face"
    with pytest.raises(AppError, match=r"layout photo has 1 face\(s\) for 2 people"):
        client.predict(person_1=[handle_file(str(FACE))], person_2=[handle_file(hopper)], prompt="x",
                       layout_image=handle_file(str(FACE)), api_name="/group", **FAST)
    with pytest.raises(AppError, match="No face found in the photo of Ben"):
        client.predict(person_1=[handle_file(str(FACE))], person_2=[handle_file(str(photos["noface"]))],
                       names="Ada, Ben", prompt="x", api_name="/group", **FAST)
    with pytest.raises(AppError, match="No photo of person 2"):
        client.predict(person_1=[handle_file(str(FACE))], person_2=None, person_3=[handle_file(hopper)], prompt="x",
                       api_name="/group", **FAST)


def test_refine_faces_round_trip(client: Client, photos: dict[str, Path]) -> None:
    """A small face (t1.jpg as the pose photo) refined on request: the caption and the warnings name it."""
    gallery, _, _, _, info = client.predict(
        handle_file(str(FACE)), "a portrait", pose_image=handle_file(str(photos["group"])), refine_faces="on",
        seed=4, api_name="/generate", **FAST,
    )
    assert gallery[0]["caption"].endswith("; refined: the face")
    assert "Refined small face(s), re-rendered at working size: the face." in info["warnings"] and "refine_ms" in info
    with pytest.raises(AppError, match="refine_faces=.yes.: choose one of auto, on, off"):
        client.predict(handle_file(str(FACE)), "x", refine_faces="yes", api_name="/generate", **FAST)


def test_restyle_round_trip(client: Client, photos: dict[str, Path]) -> None:
    gallery, seed, similarities, keypoints, _ = client.predict(
        handle_file(str(FACE)), handle_file(str(photos["hanks"])), "an oil painting", strength=0.5, seed=9,
        api_name="/restyle", **FAST,
    )
    assert seed == 9 and len(gallery) == 1 and len(similarities) == 1
    assert pixels(gallery[0]["image"]).shape == pixels(keypoints).shape
    with pytest.raises(AppError, match="strength=2"):
        client.predict(handle_file(str(FACE)), handle_file(str(photos["hanks"])), "x", strength=2,
                       api_name="/restyle", **FAST)


def test_generate_with_only_face_and_prompt(client: Client) -> None:
    gallery, seed, similarities, keypoints, timings = client.predict(
        handle_file(str(FACE)), "a knight in shining armour", api_name="/generate"
    )
    assert len(gallery) == 1 and Path(gallery[0]["image"]).is_file()
    assert 0 <= seed <= MAX_SEED, "no seed given: a random one, returned"
    assert f"seed {seed}" in gallery[0]["caption"]
    assert len(similarities) == 1
    assert Path(keypoints).is_file() and pixels(keypoints).max() > 0, "the keypoint image has coloured points"
    assert timings["total_ms"] > 0
    assert pixels(gallery[0]["image"]).ndim == 3


def test_every_speed_through_the_client(client: Client) -> None:
    """Each speed by name, with its automatic steps; the same seed gives another image per speed."""
    images = {}
    for speed in ("quality", "fast", "turbo"):
        gallery, used, *_ = client.predict(handle_file(str(FACE)), "a portrait", speed=speed, seed=9,
                                           num_steps=2, api_name="/generate")
        images[speed] = pixels(gallery[0]["image"])
    assert not np.array_equal(images["quality"], images["fast"])
    assert not np.array_equal(images["fast"], images["turbo"])
    with pytest.raises(AppError, match="speed='warp': choose one of quality, fast, turbo"):
        client.predict(handle_file(str(FACE)), "x", speed="warp", api_name="/generate")


def test_warnings_reach_a_gradio_client_caller(client: Client, photos: dict[str, Path]) -> None:
    """gr.Warning reaches only the page (gradio_client keeps it as a passing status): the last output lists them."""
    *_, info = client.predict(handle_file(str(FACE)), "a portrait", api_name="/generate", **FAST)
    assert info["warnings"] == [] and info["total_ms"] > 0
    *_, info = client.predict(handle_file(str(FACE)), "", api_name="/generate", **FAST)
    assert [w for w in info["warnings"] if w.startswith("Empty prompt")], info
    *_, info = client.predict(handle_file(str(photos["group"])), "a portrait", api_name="/generate", **FAST)
    assert "Found 6 faces in the face photo; using the largest." in info["warnings"], info
    *_, info = client.predict(handle_file(str(FACE)), handle_file(str(photos["noface"])), "a portrait",
                              api_name="/restyle", **FAST)
    assert [w for w in info["warnings"] if w.startswith("No face in the photo to restyle")], info


def test_same_seed_same_pixels(client: Client) -> None:
    def run(seed: int) -> np.ndarray:
        gallery, used, *_ = client.predict(
            handle_file(str(FACE)), "a portrait", seed=seed, api_name="/generate", **FAST
        )
        assert used == seed
        return pixels(gallery[0]["image"])

    first, again, other = run(1234), run(1234), run(4321)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_extra_faces_and_pose_photo(client: Client, photos: dict[str, Path]) -> None:
    gallery, seed, similarities, keypoints, _ = client.predict(
        handle_file(str(FACE)),
        "a portrait",
        extra_face_images=[handle_file(str(photos["astronaut_flipped"]))],
        pose_image=handle_file(str(photos["hanks"])),
        seed=5,
        api_name="/generate",
        **FAST,
    )
    assert len(gallery) == 1 and seed == 5
    with Image.open(keypoints) as kps, Image.open(gallery[0]["image"]) as out:
        assert kps.size == out.size, "the keypoint image is the IdentityNet condition at the output size"


def test_randomize_seed_and_several_images(client: Client) -> None:
    gallery, seed, similarities, *_ = client.predict(
        handle_file(str(FACE)), "a portrait", num_images=2, randomize_seed=True, api_name="/generate", **FAST
    )
    assert 0 <= seed <= 2**31 - 1
    assert len(gallery) == 2 and len(similarities) == 2
    # Consecutive seeds, each image's own in its caption, with its identity check.
    assert [item["caption"].split(";")[0] for item in gallery] == [f"#1, seed {seed}", f"#2, seed {seed + 1}"]
    assert all("no face found" in item["caption"] or "identity " in item["caption"] for item in gallery)


def test_status(client: Client) -> None:
    report = client.predict(api_name="/status")
    assert {"host", "gpu", "components", "profile", "state"} <= set(report)
    assert report["host"]["total"] > 0 and report["host"]["process_rss"] > 0
    assert report["gpu"] is None or "name" in report["gpu"] or "error" in report["gpu"]
    assert report["profile"]["name"] and report["profile"]["reason"]
    assert report["state"]["phase"] in ("not loaded", "loading", "ready", "error")
    # The tiny preset says what it really does, not the cpu profile's real-model figures.
    assert "Tiny preset" in report["profile"]["description"] and "warning" not in report["profile"]


def test_no_face_is_a_client_error(client: Client, photos: dict[str, Path]) -> None:
    with pytest.raises(AppError) as caught:
        client.predict(handle_file(str(photos["noface"])), "a portrait", api_name="/generate", **FAST)
    assert "face" in str(caught.value).lower()
    assert "Traceback" not in str(caught.value)


def test_invalid_value_is_a_client_error(client: Client) -> None:
    with pytest.raises(AppError, match="width"):
        client.predict(handle_file(str(FACE)), "x", width=100, height=128, api_name="/generate", **FAST)


def test_progress_is_reported(client: Client) -> None:
    # Polled, so enough tiny steps that some land between two polls: with 6 (about 60 ms in all) one full-suite
    # run saw none, the whole loop falling between two looks.
    job = client.submit(handle_file(str(FACE)), "a portrait", api_name="/generate", num_steps=24)
    seen = []
    while not job.done():
        update = job.status()
        if update.progress_data:
            seen.append(update.progress_data[-1])
        time.sleep(0.005)
    job.result()
    steps = [(p.index, p.length) for p in seen if p.desc == "Denoising"]
    assert steps and all(total == 24 for _, total in steps)


def test_submit_shows_previews_and_predict_returns_the_final_outputs(client: Client) -> None:
    """Nothing of the image was seen before the end. `submit()`'s job now holds intermediate outputs first (the
    stage, step i of n and the seconds so far in the info; every few steps a preview in the gallery), then the
    final ones, which are what `predict()` returns for the same request: five outputs, no preview, no progress."""
    args = (handle_file(str(FACE)), "a portrait")
    options = {"num_steps": 8, "seed": 11, "api_name": "/generate"}
    job = client.submit(*args, **options)
    final = job.result(timeout=120)
    *working, last = job.outputs()
    assert last == final and working
    previews = [out[0] for out in working if isinstance(out[0], list)]
    assert previews and all(len(g) == 1 and g[0]["caption"].startswith("preview, step ") for g in previews)
    with Image.open(previews[0][0]["image"]) as image:
        assert max(image.size) == 256  # api.PREVIEW_SIDE
    progress = [out[4]["progress"] for out in working]
    steps = [p["step"] for p in progress if "step" in p]
    assert steps == sorted(steps) and steps[-1] == 8 and all(p["steps"] == 8 for p in progress if "step" in p)
    elapsed = [p["elapsed_s"] for p in progress]
    assert elapsed == sorted(elapsed)

    predicted = client.predict(*args, **options)
    assert type(predicted) is tuple and len(predicted) == 5
    gallery, seed, similarities, keypoints, info = predicted
    assert seed == 11 and [g["caption"] for g in gallery] == [g["caption"] for g in final[0]]
    assert gallery[0]["caption"].startswith("seed 11") and "progress" not in info and set(info) == set(final[4])
    assert similarities == final[2] and pixels(keypoints).shape == pixels(final[3]).shape
    assert np.array_equal(pixels(gallery[0]["image"]), pixels(final[0][0]["image"]))


def test_four_concurrent_clients(app: tuple[str, Path]) -> None:
    def one(i: int):
        c = Client(app[0], verbose=False)
        return c.predict(handle_file(str(FACE)), f"portrait {i}", seed=i, api_name="/generate", **FAST)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert [r[1] for r in results] == [0, 1, 2, 3]
    assert all(len(r[0]) == 1 for r in results)


def test_status_answers_during_a_generation(client: Client, app: tuple[str, Path]) -> None:
    job = client.submit(handle_file(str(FACE)), "a slow portrait", num_steps=80, api_name="/generate")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        update = job.status()
        if update.progress_data and update.progress_data[-1].desc == "Denoising":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the generation never reported denoising progress")
    other = Client(app[0], verbose=False)
    t0 = time.monotonic()
    report = other.predict(api_name="/status")
    elapsed = time.monotonic() - t0
    assert not job.done(), "status should have answered while the generation was still running"
    assert report["state"]["phase"] == "ready"
    assert re.fullmatch(r"generating \(step \d+ of 80\)", report["state"]["activity"]), report["state"]
    assert elapsed < 10
    job.result()
    assert other.predict(api_name="/status")["state"]["activity"] == "idle"


@pytest.mark.slow  # starts its own app
def test_gradio_mcp_server_0_turns_mcp_off(tmp_path: Path, tiny_cache: Path) -> None:
    """MCP is served by default (tests/test_mcp.py drives every tool through the official client on the session's
    app); GRADIO_MCP_SERVER=0 serves the app without it, and says so in the page's config."""
    app = apprunner.start_app(tmp_path, tiny_cache, GRADIO_MCP_SERVER="0", INSTANTID_PRELOAD="0")
    try:
        config = httpx.get(f"{app.url}config", timeout=10).json()
        schema = httpx.get(f"{app.url}gradio_api/mcp/schema", timeout=10)
        sse = httpx.get(f"{app.url}gradio_api/mcp/sse", timeout=10)
    finally:
        app.stop()
    assert config["mcp_server"] is False
    assert schema.status_code == 404 and sse.status_code == 404
    assert "MCP" not in app.log_text()


def _top_level_partials(folder: Path) -> list[Path]:
    return [p for p in folder.glob(f"{PARTIAL_PREFIX}*") if p.is_file()] if folder.is_dir() else []


def test_uploads_one_client_parks_are_bounded_and_aborted_ones_leave_nothing(tmp_path: Path, tiny_cache: Path) -> None:
    """15 x 20 MB in 4 s used to stay parked until the hourly sweep; an upload aborted mid-body left its partial
    file behind, and a traceback in the log."""
    app = apprunner.start_app(tmp_path, tiny_cache, INSTANTID_PRELOAD="0", INSTANTID_MAX_UPLOAD_MB="1")
    try:
        url = f"{app.url}gradio_api/upload"

        def upload(size: int, i: int) -> Path:
            answer = httpx.post(url, files={"files": (f"photo{i}.bin", os.urandom(size))}, timeout=30)
            assert answer.status_code == 200, answer.text
            return Path(answer.json()[0])

        small = [upload(1000, i) for i in range(MAX_PARKED_UPLOADS + 5)]
        assert [p.exists() for p in small] == [False] * 5 + [True] * MAX_PARKED_UPLOADS, "the oldest go first"
        # Bytes too: at most MAX_PARKED_UPLOAD_LIMITS uploads of the limit (1 MiB here) stay.
        large = [upload(1_000_000, i) for i in range(MAX_PARKED_UPLOAD_LIMITS + 3)]
        assert sum(p.exists() for p in large) == MAX_PARKED_UPLOAD_LIMITS
        assert not any(p.exists() for p in small), "one client's bound counts every upload it parked"

        # Aborted mid-body: headers announce 900 kB, the client sends 300 kB and hangs up.
        port = int(app.url.rstrip("/").rsplit(":", 1)[1])
        boundary = "instantid-test"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="cut.bin"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(head) + 900_000}\r\n"
                    f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + head + b"x" * 300_000
                )
                time.sleep(0.5)  # let the server write part of it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            _top_level_partials(app.temp_dir) or app.log_text().count("upload aborted") < 3
        ):
            time.sleep(0.2)
        assert _top_level_partials(app.temp_dir) == []
        assert app.log_text().count("upload aborted") == 3
        assert "Traceback" not in app.log_text()
        assert upload(1000, 99).exists(), "the next upload is served as before"
    finally:
        app.stop()


def test_upload_bound_keeps_a_photo_uploaded_again_and_another_client_s_copy(tmp_path: Path) -> None:
    """Gradio stores identical uploads at one path: uploading the same face again must make it the newest (not
    delete it as the oldest), and another client's copy of it is never deleted for this client's bound."""
    guard = UploadGuard(None, tmp_path, max_upload_bytes=10**9)

    def stored(name: str) -> str:
        path = tmp_path / name / "photo.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
        return str(path)

    face = stored("face")
    guard._park("a", json.dumps([face]).encode())
    guard._park("b", json.dumps([stored("shared")]).encode())
    guard._park("a", json.dumps([str(tmp_path / "shared" / "photo.png")]).encode())
    for i in range(MAX_PARKED_UPLOADS - 3):
        guard._park("a", json.dumps([stored(f"p{i}")]).encode())
    guard._park("a", json.dumps([face]).encode())  # the same photo again, as gradio_client sends it each call
    for i in range(3):  # 22 in all: the shared photo leaves a's count without being deleted, then p0 goes
        guard._park("a", json.dumps([stored(f"q{i}")]).encode())
    assert Path(face).exists(), "uploaded again: the newest, not the oldest"
    assert (tmp_path / "shared" / "photo.png").exists(), "client b's upload too"
    assert not (tmp_path / "p0" / "photo.png").exists() and (tmp_path / "p1" / "photo.png").exists()
