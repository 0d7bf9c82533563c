"""Hardening: hostile uploads, bad prompts and parameters, faults, and trust, end to end.

Each upload of the generated corpus (`tests/hostile.py`) is decided once, where the decision is made: the
engine's CPU stage (`UserError` subclasses with one sentence, or a job with the right faces, warning and
orientation). A few cases then go through each way in, to show the decision arrives intact: the engine's
whole generation, the command line (`python -m instantid generate`: exit 2 and one `error:` line, no
traceback) and the real app over HTTP with `gradio_client` (the refusal sentence reaches the client, and the
app answers the next request). Faults are injected into
a real tiny-preset engine: a checkpoint missing from the cache, CUDA out-of-memory errors, exceptions
in the middle of denoising, clients that cancel or disconnect.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from instantid import errors
from instantid.declaration import MAX_PROMPT_CHARS
from instantid.request.requests import Request
from tests import apprunner, hostile

FAST = {"num_steps": 1, "seed": 1}
SECRET = apprunner.SECRET_TOKEN


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return hostile.build_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def app(tiny_app: apprunner.App) -> apprunner.App:
    # The session's app (conftest): HF_TOKEN=SECRET in its environment, as on a Space with a token.
    return tiny_app


@pytest.fixture(scope="module")
def client(app: apprunner.App) -> Client:
    return Client(app.url, verbose=False)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instantid", *args], env=env, capture_output=True, text=True, timeout=300
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_refusal(r: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and fragment in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def engine_request(face: Any, **kw: Any) -> Request:
    kw.setdefault("prompt", "a portrait")
    for key, value in FAST.items():
        kw.setdefault(key, value)
    return Request(face_images=[face], **kw)


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def pixels(result: Any) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


# --- the command line ------------------------------------------------------------------------------
# In process, `instantid.frontends.cli.main` (argument parsing, the engine, error printing, exit status) runs
# against the shared tiny engine in milliseconds per refusal. A few runs are real `python -m instantid`
# processes (2-3 s each for a refusal, about 10 s for a tiny generation), in one pool started by the first
# test that needs them.

# Control characters, and bytes that are not UTF-8 (Python hands those over as lone surrogates).
CLI_PROMPT = "a portrait\x1b[31m in red\x07" + os.fsdecode(b" \xff\xfe of a person")
LONG_PROMPT = "x" * (MAX_PROMPT_CHARS + 1)
CLI_PARAMETERS = [
    (["--seed", "-1"], "--seed -1: must be an integer in 0..2147483647"),
    (["--guidance", "50"], "--guidance 50.0: must be a number in 0..20"),
    (["--num-images", "9"], "--num-images 9: must be an integer in 1..4"),
    (["--adapter-strength", "2"], "--adapter-strength 2.0: must be a number in 0..1.5"),
    (["--width", "4096", "--height", "128"], "--width 4096: use 0 (automatic) or a multiple of 64 up to 1280"),
    (["--prompt", LONG_PROMPT], f"use at most {MAX_PROMPT_CHARS} characters"),
    (["--controlnet", "thibaud/controlnet-openpose-sdxl-1.0"], "choose from pose, canny, depth"),
    (["--scheduler", "../../etc/passwd"], "choose one of EulerDiscreteScheduler"),
]

# Each hostile upload is decided once, where the decision is made (`test_hostile_upload_is_decided`: the
# engine's CPU stage, which decodes with instantid.vision.images and finds the faces). The front ends only carry
# that decision: a few cases each show that a refusal, a bomb, a missing face and an accepted photo (with
# its warning or its orientation) come through intact, in each front end's own form.
THROUGH_ENGINE = ["truncated_jpeg", "no_face", "rgb16", "exif_rotate_6", "many_faces"]
THROUGH_CLI = ["empty", "bomb_declared_png", "strip", "face_too_small", "cmyk", "exif_rotate_6"]
THROUGH_PROCESS = ["truncated_jpeg", "exif_rotate_6"]  # the accepted one carries test_cli_prompts too
# oversized_bytes: only the API has its own check (Gradio's upload limit); the others as above.
THROUGH_API = ["oversized_bytes", "text", "bomb_real_png", "no_face", "exif_rotate_6"]
PROCESS_PARAMETERS = [CLI_PARAMETERS[0]]


def cases(names: list[str]) -> list[hostile.Case]:
    return [hostile.BY_NAME[name] for name in names]


def upload_args(path: Path, out: Path) -> list[str]:
    return [
        "generate", "--face", str(path), "--prompt", CLI_PROMPT, "--negative-prompt", "blurry\x7f",
        "--steps", "1", "--seed", "1", "--json", "--out", str(out),
    ]


@pytest.fixture
def cli_main(tiny_engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`python -m instantid ...` in this process, on the shared tiny engine: (exit status, stdout, stderr)."""
    import instantid.engine as engine_mod
    from instantid.frontends.cli import main

    monkeypatch.setattr(engine_mod, "_engine", tiny_engine)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


@pytest.fixture(scope="module")
def cli_runs(
    corpus: dict[str, Path], tiny_env: dict[str, str], photos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("cli-out")
    jobs: dict[str, list[str]] = {}
    for case in cases(THROUGH_PROCESS):
        jobs[f"upload:{case.name}"] = upload_args(corpus[case.name], out / f"{case.name}.png")
    for i, (args, _) in enumerate(PROCESS_PARAMETERS):
        jobs[f"param:{i}"] = ["generate", "--face", str(photos["astronaut"]), "--out", str(out / "p.png"), *args]
    # The one full generation first, so that it overlaps the quick refusals.
    order = sorted(jobs.items(), key=lambda kv: kv[0] not in {f"upload:{c.name}" for c in hostile.ACCEPTED})
    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(lambda kv: (kv[0], cli(tiny_env, *kv[1])), order))


def check_cli_upload(r: subprocess.CompletedProcess[str], case: hostile.Case) -> None:
    if case.expect == hostile.REFUSE:
        assert_clean_refusal(r, case.message)
        return
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["faces_found"] == case.faces
    if case.message:
        assert any(case.message in w for w in summary["warnings"])
        assert any(line.startswith("warning:") and case.message in line for line in r.stderr.splitlines())
    if case.landscape is not None:
        width, height = summary["size"]
        assert (width > height) == case.landscape
        assert image_size(summary["images"][0]) == (width, height)


# --- 1. uploads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", hostile.CASES, ids=lambda c: c.id)
def test_hostile_upload_is_decided(tiny_engine, corpus: dict[str, Path], case: hostile.Case) -> None:
    """Every case, once: refused with its one sentence (bombs from the header), or accepted as it should be."""
    path = corpus[case.name]
    if case.expect == hostile.REFUSE:
        t0 = time.perf_counter()
        with pytest.raises(getattr(errors, case.error)) as caught:
            tiny_engine.prepare(engine_request(str(path)))
        elapsed = time.perf_counter() - t0
        message = str(caught.value)
        assert case.message in message and "face photo" in message
        assert message.count(". ") <= 1 and message.endswith("."), "one sentence that says what to do"
        if case.bomb:
            assert elapsed < 0.5, f"a decompression bomb must be refused from its header, took {elapsed:.2f} s"
        return
    job = tiny_engine.prepare(engine_request(str(path)))
    assert job.faces_found == case.faces
    if case.message:
        assert any(case.message in w for w in job.warnings), job.warnings
    if case.landscape is not None:
        assert (job.width > job.height) == case.landscape, (job.width, job.height)


@pytest.mark.parametrize("case", cases(THROUGH_ENGINE), ids=lambda c: c.id)
def test_engine_hostile_upload(tiny_engine, corpus: dict[str, Path], case: hostile.Case) -> None:
    """A whole generation carries the decision: the same refusal, or images of the size the photo asked for."""
    path = corpus[case.name]
    if case.expect == hostile.REFUSE:
        with pytest.raises(getattr(errors, case.error), match=re.escape(case.message)):
            tiny_engine.run(engine_request(str(path)))
        return
    result = tiny_engine.run(engine_request(str(path)))
    assert len(result.images) == 1 and result.images[0].size == (result.width, result.height)
    assert result.faces_found == case.faces
    if case.message:
        assert any(case.message in w for w in result.warnings), result.warnings
    if case.landscape is not None:
        assert (result.width > result.height) == case.landscape, (result.width, result.height)


# Restyle's and swap's own photos: the same decoding; a refusal from the bytes, the header and the size.
OTHER_PHOTO_CASES = ["html", "truncated_png", "bomb_declared_gif", "sliver"]


@pytest.mark.parametrize("case", cases(OTHER_PHOTO_CASES), ids=lambda c: c.id)
@pytest.mark.parametrize(("mode", "photo", "what"), [("restyle", "source_image", "photo to restyle"),
                                                      ("swap", "target_image", "photo to swap a face into")])
def test_engine_hostile_source_and_target(tiny_engine, corpus: dict[str, Path], photos: dict[str, Path],
                                          case: hostile.Case, mode: str, photo: str, what: str) -> None:
    """Restyle's and swap's own photos go through the same decoding, refused with the same sentence naming them."""
    with pytest.raises(getattr(errors, case.error)) as caught:
        extra = {"strength": 1.0} if mode == "restyle" else {}  # FAST's one step: 0.8 of it would be no step
        tiny_engine.prepare(engine_request(str(photos["astronaut"]), mode=mode, **{photo: str(corpus[case.name])},
                                           **extra))
    assert case.message in str(caught.value) and what in str(caught.value)


@pytest.mark.parametrize("case", cases(THROUGH_CLI), ids=lambda c: c.id)
def test_cli_hostile_upload(cli_main, corpus: dict[str, Path], tmp_path: Path, case: hostile.Case) -> None:
    check_cli_upload(cli_main(*upload_args(corpus[case.name], tmp_path / "out.png")), case)


@pytest.mark.parametrize("case", cases(THROUGH_PROCESS), ids=lambda c: c.id)
def test_cli_process_hostile_upload(cli_runs: dict[str, subprocess.CompletedProcess[str]], case: hostile.Case) -> None:
    check_cli_upload(cli_runs[f"upload:{case.name}"], case)


@pytest.mark.parametrize("case", cases(THROUGH_API), ids=lambda c: c.id)
def test_api_hostile_upload(client: Client, corpus: dict[str, Path], case: hostile.Case) -> None:
    face = handle_file(str(corpus[case.name]))
    if case.name == "oversized_bytes":
        # The app tells Gradio its upload limit: gradio_client refuses before sending, the server with a 413.
        with pytest.raises(ValueError, match="exceeds the maximum file size"):
            client.predict(face, "a portrait", api_name="/generate", **FAST)
        with corpus[case.name].open("rb") as fh:
            r = httpx.post(client.src.rstrip("/") + "/gradio_api/upload", files={"files": fh}, timeout=60)
        assert r.status_code == 413 and "maximum allowed size" in r.text, (r.status_code, r.text[:200])
        return
    if case.expect == hostile.REFUSE:
        t0 = time.perf_counter()
        with pytest.raises(AppError) as caught:
            client.predict(face, "a portrait", api_name="/generate", **FAST)
        message = str(caught.value)
        assert case.message in message, message
        assert "Traceback" not in message
        if case.bomb:
            assert time.perf_counter() - t0 < 5, "a bomb must be refused without decoding (upload included)"
        return
    gallery, seed, _, keypoints, _ = client.predict(face, "a portrait", api_name="/generate", **FAST)
    assert len(gallery) == 1 and seed == FAST["seed"]
    width, height = image_size(gallery[0]["image"])
    assert image_size(keypoints) == (width, height)
    if case.landscape is not None:
        assert (width > height) == case.landscape


@pytest.mark.parametrize("name", ["text", "html"])
def test_api_hostile_target_and_source(client: Client, corpus: dict[str, Path], photos: dict[str, Path],
                                       name: str) -> None:
    face, bad = handle_file(str(photos["astronaut"])), handle_file(str(corpus[name]))
    case = next(c for c in hostile.CASES if c.name == name)
    for endpoint, values in (("/swap", {"target_image": bad}), ("/restyle", {"source_image": bad, "strength": 1.0})):
        with pytest.raises(AppError) as caught:
            client.predict(face, prompt="a portrait", api_name=endpoint, **values, **FAST)
        assert case.message in str(caught.value) and "Traceback" not in str(caught.value)


def test_api_keeps_serving_after_the_corpus(client: Client, photos: dict[str, Path]) -> None:
    """After the hostile uploads, the shared pipeline still makes the exact image it made before."""
    def once() -> np.ndarray:
        gallery, *_ = client.predict(handle_file(str(photos["astronaut"])), "a portrait", api_name="/generate", **FAST)
        with Image.open(gallery[0]["image"]) as im:
            return np.asarray(im.convert("RGB"))

    first = once()
    report = client.predict(api_name="/status")
    assert report["state"]["phase"] == "ready"
    assert np.array_equal(first, once())


# --- 2. prompts ----------------------------------------------------------------------------------

PROMPTS = {
    # name: (prompt, warning fragment or None)
    "empty": ("", "Empty prompt"),
    "whitespace": ("   \n\t  ", "Empty prompt"),
    "only_control_characters": ("\x00\x01\x1b\x07\x7f", "Empty prompt"),
    "control_characters": ("a portrait\x00 of a \x1b[31mperson\x08\r\n in a garden", "control character"),
    "lone_surrogate": ("a portrait \ud800 of a person", "control character"),
    "unicode_and_emoji": ("портрет 👩🏽‍🚀 宇航员 فضاء ástronaut\u200b!", None),
    # Read in full in 75-token blocks (prompts.py): nothing is cut, so nothing to warn about.
    "longer_than_77_tokens": (" ".join(["a very detailed portrait photo"] * 40), None),
    "unbalanced_emphasis": ("a (very detailed [portrait:1.3 photo)) of a person", None),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_engine_prompts(tiny_engine, photos: dict[str, Path], name: str) -> None:
    prompt, warning = PROMPTS[name]
    result = tiny_engine.run(engine_request(str(photos["astronaut"]), prompt=prompt))
    assert len(result.images) == 1
    if warning is None:
        assert not result.warnings, result.warnings
    else:
        assert any(warning in w for w in result.warnings), result.warnings


def test_control_characters_are_stripped_before_the_encoders() -> None:
    req = Request(face_images=["x"], prompt="a\x00b\x1b[1mc\td\ne\r\ud800f 👩🏽‍🚀", negative_prompt="\x07x")
    assert req.prompt == "ab[1mc\td\nef 👩🏽‍🚀" and req.negative_prompt == "x"
    assert req.notes == (
        "Removed 4 control character(s) from the prompt.", "Removed 1 control character(s) from the negative prompt."
    )


def test_engine_prompt_too_long(tiny_engine, photos: dict[str, Path]) -> None:
    with pytest.raises(errors.InvalidParameter, match=f"prompt=.*at most {MAX_PROMPT_CHARS} characters"):
        tiny_engine.run(engine_request(str(photos["astronaut"]), prompt=LONG_PROMPT))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_api_prompts(client: Client, photos: dict[str, Path], name: str) -> None:
    prompt, _ = PROMPTS[name]
    if name == "lone_surrogate":
        # gradio_client cannot encode it; raw JSON carries it as a \\ud800 escape that the server decodes.
        gallery, *_ = raw_generate_ok(client, photos, prompt=prompt)
    else:
        gallery, *_ = client.predict(handle_file(str(photos["astronaut"])), prompt, api_name="/generate", **FAST)
    assert len(gallery) == 1


def test_api_prompt_too_long(client: Client, photos: dict[str, Path]) -> None:
    with pytest.raises(AppError, match=f"prompt=.*at most {MAX_PROMPT_CHARS} characters"):
        client.predict(handle_file(str(photos["astronaut"])), LONG_PROMPT, api_name="/generate", **FAST)


def test_cli_prompts(cli_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    [accepted] = [c for c in cases(THROUGH_PROCESS) if c.expect == hostile.ACCEPT]
    r = cli_runs[f"upload:{accepted.name}"]
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: Removed 4 control character(s) from the prompt." in r.stderr
    assert "warning: Removed 1 control character(s) from the negative prompt." in r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "Traceback" not in r.stderr


# --- 3. parameters -------------------------------------------------------------------------------

# (engine request fields, API arguments, what the message must say: parameter=value and the allowed range)
BAD_PARAMETERS = [
    ({"num_steps": 1000}, {"num_steps": 1000}, r"num_steps=1000: must be an integer in [01]\.\.100"),
    ({"num_steps": 2.5}, {"num_steps": 2.5}, r"num_steps=2\.5: must be an integer in [01]\.\.100"),
    (
        {"num_steps": 60, "enable_lcm": True},
        {"num_steps": 60, "enable_lcm": True},
        r"num_steps=60: use 1\.\.50 with LCM fast mode",
    ),
    # The API's upper bound is the server's profile's (the cpu profile makes at most 2), the engine's the declared 4.
    ({"num_images": 9}, {"num_images": 9}, r"num_images=9: must be an integer in 1\.\.[1-4]\."),
    ({"num_images": 0}, {"num_images": 0}, r"num_images=0: must be an integer in 1\.\.[1-4]\."),
    ({"guidance_scale": 50}, {"guidance_scale": 50}, r"guidance_scale=50: must be a number in 0\.\.20"),
    ({"guidance_scale": -3}, {"guidance_scale": -3}, r"guidance_scale=-3: must be a number in 0\.\.20"),
    ({"identitynet_strength": 2}, {"identitynet_strength": 2}, r"identitynet_strength=2: .*0\.\.1\.5"),
    ({"adapter_strength": -0.5}, {"adapter_strength": -0.5}, r"adapter_strength=-0\.5: .*0\.\.1\.5"),
    ({"width": 100, "height": 128}, {"width": 100, "height": 128}, r"width=100: .*multiple of 64"),
    ({"width": 4096, "height": 128}, {"width": 4096, "height": 128}, r"width=4096: .*(0\.\.| up to )1280"),
    ({"seed": -1}, {"seed": -1}, r"seed=-1: must be an integer in 0\.\.2147483647"),
    ({"seed": 2**31}, {"seed": 2**31}, r"seed=2147483648: must be an integer in 0\.\.2147483647"),
    ({"style": "Cubism"}, {"style": "Cubism"}, r"style='Cubism': choose .*Watercolor"),
    ({"scheduler": "Nope"}, {"scheduler": "Nope"}, r"scheduler='Nope': choose .*EulerDiscreteScheduler"),
    (
        {"scheduler": "diffusers.LCMScheduler"},
        {"scheduler": "diffusers.LCMScheduler"},
        r"scheduler='diffusers\.LCMScheduler': choose .*UniPCMultistepScheduler",
    ),
    ({"controlnets": {"sketch": 0.5}}, {"controlnets": ["sketch"]}, r"controlnets=.*sketch.*pose, canny, depth"),
    (
        # A repo id where a ControlNet name belongs: never loaded, always refused.
        {"controlnets": {"thibaud/controlnet-openpose-sdxl-1.0": 0.5}},
        {"controlnets": ["thibaud/controlnet-openpose-sdxl-1.0"]},
        r"controlnets=.*thibaud/controlnet-openpose-sdxl-1\.0.*pose, canny, depth",
    ),
    (
        {"controlnets": {"canny": 9}},
        {"controlnets": {"canny": 9}},
        r"controlnets\[canny\]=9: must be a number in 0\.\.1\.5",
    ),
]
PARAM_IDS = [re.sub(r"[^A-Za-z0-9_=.-]+", "", str(api)) for _, api, _ in BAD_PARAMETERS]


@pytest.mark.parametrize(("fields", "api", "pattern"), BAD_PARAMETERS, ids=PARAM_IDS)
def test_engine_rejects_bad_parameter(tiny_engine, photos, fields: dict, api: dict, pattern: str) -> None:
    with pytest.raises(errors.InvalidParameter, match=pattern):
        tiny_engine.run(engine_request(str(photos["astronaut"]), **{**FAST, **fields}))


@pytest.mark.parametrize(("fields", "api", "pattern"), BAD_PARAMETERS, ids=PARAM_IDS)
def test_api_rejects_bad_parameter(client: Client, photos, fields: dict, api: dict, pattern: str) -> None:
    with pytest.raises(AppError, match=pattern):
        client.predict(handle_file(str(photos["astronaut"])), "a portrait", api_name="/generate", **{**FAST, **api})


@pytest.mark.parametrize(("args", "message"), CLI_PARAMETERS, ids=[a[0] for a, _ in CLI_PARAMETERS])
def test_cli_rejects_bad_parameter(cli_main, photos: dict[str, Path], tmp_path: Path, args: list[str],
                                   message: str) -> None:
    r = cli_main("generate", "--face", str(photos["astronaut"]), "--out", str(tmp_path / "o.png"), *args)
    assert_clean_refusal(r, message)


@pytest.mark.parametrize(("args", "message"), PROCESS_PARAMETERS, ids=[a[0] for a, _ in PROCESS_PARAMETERS])
def test_cli_process_rejects_bad_parameter(cli_runs: dict[str, subprocess.CompletedProcess[str]], args: list[str],
                                           message: str) -> None:
    assert_clean_refusal(cli_runs[f"param:{PROCESS_PARAMETERS.index((args, message))}"], message)


def test_api_has_no_parameter_that_selects_a_model(client: Client) -> None:
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(info) == {"/generate", "/restyle", "/swap", "/group", "/status"}
    for endpoint in ("/generate", "/restyle", "/swap", "/group"):
        names = [p["parameter_name"] for p in info[endpoint]["parameters"]]
        for word in ("model", "repo", "checkpoint", "lora", "weights", "path", "url", "cache", "token", "revision"):
            assert not [n for n in names if word in n], (endpoint, word, names)
    assert info["/status"]["parameters"] == []


# Raw HTTP, as a hostile client would send it: a file reference that Gradio did not receive as an upload.
def generate_payload(client: Client, **values: Any) -> dict[str, Any]:
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    data = [p.get("parameter_default") for p in params]
    values = {**FAST, **values}
    for key, value in values.items():
        data[names.index(key)] = value
    return {"data": data}


def raw_generate(client: Client, **values: Any) -> tuple[str, Any]:
    """POST /call/generate and read its event stream: ("complete" | "error", data)."""
    return apprunner.call_events(client.src, "generate", json.dumps(generate_payload(client, **values)))


def upload(client: Client, path: Path) -> dict[str, Any]:
    base = client.src.rstrip("/") + "/gradio_api"
    with path.open("rb") as fh:
        r = httpx.post(f"{base}/upload", files={"files": (path.name, fh, "image/png")}, timeout=30)
    r.raise_for_status()
    return {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def raw_generate_ok(client: Client, photos: dict[str, Path], **values: Any) -> Any:
    event, data = raw_generate(client, face_image=upload(client, photos["astronaut"]), **values)
    assert event == "complete", data
    return data


def file_ref(path: str) -> dict[str, Any]:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


SERVER_SIDE = {
    # A real face photo on the server's disk, outside Gradio's upload folder: it would work if read.
    "server_path": lambda photos, app: {"face_image": file_ref(str(photos["astronaut"]))},
    "server_path_in_repo": lambda photos, app: {
        "face_image": file_ref(str(apprunner.ROOT / "assets" / "astronaut.jpg"))
    },
    "system_file": lambda photos, app: {"face_image": file_ref("/etc/passwd")},
    "raw_string_path": lambda photos, app: {"face_image": str(photos["astronaut"])},
    "relative_path": lambda photos, app: {"face_image": file_ref("assets/astronaut.jpg")},
    "parent_traversal": lambda photos, app: {"face_image": file_ref(f"{app.temp_dir}/../../../../etc/passwd")},
    "file_url": lambda photos, app: {"face_image": file_ref(f"file://{photos['astronaut']}")},
    "loopback_url": lambda photos, app: {"face_image": file_ref(f"{app.url}gradio_api/file={photos['astronaut']}")},
    "extra_face_server_path": lambda photos, app: {"extra_face_images": [file_ref(str(photos["astronaut"]))]},
    "pose_server_path": lambda photos, app: {"pose_image": file_ref(str(photos["hanks"]))},
}


@pytest.mark.parametrize("name", list(SERVER_SIDE))
def test_api_never_reads_server_files_or_urls(client: Client, app: apprunner.App, photos: dict[str, Path],
                                              name: str) -> None:
    values = SERVER_SIDE[name](photos, app)
    if "face_image" not in values:
        values["face_image"] = upload(client, photos["astronaut"])
    event, data = raw_generate(client, **values)
    assert event == "error", f"{name}: the server used a file it was not sent: {str(data)[:300]}"
    assert "root:" not in json.dumps(data)
    # Refused before our code runs, by Gradio itself: still a sentence for the client, never `null`.
    assert isinstance(data, dict) and isinstance(data.get("error"), str) and len(data["error"]) > 20, data
    # ...and through gradio_client a plain string is a string, never a file the server would open.
    if name == "raw_string_path":
        with pytest.raises(AppError):
            client.predict(str(photos["astronaut"]), "a portrait", api_name="/generate", **FAST)


def data_url(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


URL_OBJECTS = {
    "https": lambda client, photos: {"face_image": {"url": "https://example.com/face.png",
                                                    "meta": {"_type": "gradio.FileData"}}},
    # A real face photo as a data: URL: Gradio would decode it before any limit of ours, and re-encode it.
    "data": lambda client, photos: {"face_image": {"url": data_url(photos["astronaut"]),
                                                   "meta": {"_type": "gradio.FileData"}}},
    "data_pose": lambda client, photos: {"face_image": upload(client, photos["astronaut"]),
                                         "pose_image": {"url": data_url(photos["hanks"]),
                                                        "meta": {"_type": "gradio.FileData"}}},
}


@pytest.mark.parametrize("name", list(URL_OBJECTS))
def test_api_image_given_as_a_url_object_is_refused_in_words(client: Client, photos: dict[str, Path],
                                                             name: str) -> None:
    values = URL_OBJECTS[name](client, photos)
    field = "pose_image" if "pose_image" in values else "face_image"
    event, data = raw_generate(client, **values)
    assert event == "error" and field in data["error"] and "handle_file" in data["error"], data
    assert "ImageData(" not in data["error"], "the message printed an internal object"


# A data: URL as a file path was written into the log whole, twice per request (565 KB each for a real photo),
# and Gradio's refusal of a relative path or a file:// reference named the server's checkout to the client.
BIG_DATA_URL = "data:image/png;base64," + "QUJD" * 150_000  # 600 KB
PAYLOAD_REFS = {
    "data_url_path": ("face_image", lambda app: {"face_image": file_ref(BIG_DATA_URL)}),
    "relative_path": ("face_image", lambda app: {"face_image": file_ref("assets/astronaut.jpg")}),
    "file_url": ("face_image", lambda app: {"face_image": file_ref(f"file://{apprunner.ROOT}/assets/astronaut.jpg")}),
    "parent_path": ("pose_image", lambda app: {"pose_image": file_ref("../" * 8 + "etc/passwd")}),
    # A file reference where no photo is taken: Gradio reads file references in any input.
    "data_url_in_controlnets": ("controlnets", lambda app: {"controlnets": file_ref(BIG_DATA_URL)}),
}


@pytest.mark.parametrize("name", list(PAYLOAD_REFS))
def test_a_file_reference_is_refused_by_name_without_server_paths_or_log_growth(
        client: Client, app: apprunner.App, photos: dict[str, Path], name: str) -> None:
    field, make = PAYLOAD_REFS[name]
    values = make(app)
    values.setdefault("face_image", upload(client, photos["astronaut"]))
    logged = app.log.stat().st_size
    event, data = raw_generate(client, **values)
    message = data["error"] if isinstance(data, dict) else str(data)
    assert event == "error" and message.startswith(f"Invalid {field}: send the photo itself as an upload"), message
    for server_path in (str(apprunner.ROOT), str(app.temp_dir), "/etc/passwd", "/work", "/home", "/tmp"):
        assert server_path not in message, message
    assert "QUJDQUJD" not in message and len(message) < 400, message[:500]
    # Gradio prints a refusal's traceback before it answers, and the app's output is unbuffered.
    grown = app.log.stat().st_size - logged
    assert grown < 2000, f"the log grew by {grown} bytes: {app.log_text()[-1000:]}"
    assert "QUJDQUJDQUJD" not in app.log_text()


def test_no_log_record_carries_a_payload_whole() -> None:
    """The app's record factory (installed by app.py): a message, and each line of a logged traceback, is cut
    to a few hundred bytes with the count of what was left out; a short one is untouched."""
    import logging

    from instantid.frontends.gradio_adapter import LOG_LIMIT, bound_log_records

    previous = logging.getLogRecordFactory()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            record.formatted = self.format(record)  # type: ignore[attr-defined]

    logger = logging.getLogger("tests.payload")
    handler = Keep()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        bound_log_records()
        bound_log_records()  # idempotent
        logger.warning("request from %s: %s", "client", BIG_DATA_URL)
        try:
            raise OSError(36, "File name too long", BIG_DATA_URL)
        except OSError:
            logger.exception("failed")
        logger.warning("short %s", "message")
    finally:
        logging.setLogRecordFactory(previous)
        logger.removeHandler(handler)
    cut, traced, short = (r.formatted for r in records)  # type: ignore[attr-defined]
    assert len(cut) < LOG_LIMIT + 100 and "more bytes not shown" in cut and cut.startswith("request from client")
    assert "File name too long" in traced and max(len(line) for line in traced.splitlines()) < LOG_LIMIT + 100
    assert short == "short message"


def test_an_unexpected_error_reaches_the_client_without_server_paths() -> None:
    """What `guard_requests` sends for an exception other than gr.Error escaping Gradio's processing."""
    from instantid.frontends.gradio_adapter import client_sentence

    said = client_sentence(FileNotFoundError(2, "No such file", f"{apprunner.ROOT}/assets/x.jpg"))
    assert str(apprunner.ROOT) not in said and "(a path on the server)" in said and "No such file" in said
    said = client_sentence(ValueError("Cannot move ../../etc/passwd or ~/secret or /srv/app/ok.png; see http://x/y"))
    assert "passwd" not in said and "secret" not in said and "/srv" not in said and "http://x/y" in said, said
    assert len(client_sentence(ValueError("x" * 100_000))) < 400


# --- 3b. strict types: what Gradio would convert is refused as sent ---------------------------------

LOOSE_VALUES = [
    ({"randomize_seed": "false"}, r"randomize_seed='false': must be true or false"),
    ({"enable_lcm": "false"}, r"enable_lcm='false': must be true or false"),
    ({"enable_lcm": "yes"}, r"enable_lcm='yes': must be true or false"),
    ({"enable_lcm": 2}, r"enable_lcm=2: must be true or false"),
    ({"enhance_face_region": 1}, r"enhance_face_region=1: must be true or false"),
    ({"seed": 3.7}, r"seed=3\.7: must be an integer in 0\.\.2147483647"),
    ({"num_images": "2"}, r"num_images='2': must be a number, not str"),
    ({"adapter_strength": True}, r"adapter_strength=True: must be a number, not bool"),
    ({"prompt": 5}, r"prompt=5: must be text, not int"),
    ({"prompt": {"a": 1}}, r"prompt=\{'a': 1\}: must be text, not dict"),
    ({"negative_prompt": ["x"]}, r"negative_prompt=\['x'\]: must be text, not list"),
    ({"controlnets": {"pose": "0.4"}}, r"controlnets\[pose\]='0.4': must be a number, not str"),
    ({"controlnets": "pose"}, r"controlnets='pose': must map names \(pose, canny, depth\) to strengths"),
]


@pytest.mark.parametrize(("values", "pattern"), LOOSE_VALUES, ids=[str(v) for v, _ in LOOSE_VALUES])
def test_api_refuses_loose_types(client: Client, photos: dict[str, Path], values: dict, pattern: str) -> None:
    values = {"face_image": handle_file(str(photos["astronaut"])), "prompt": "a portrait", **FAST, **values}
    with pytest.raises(AppError, match=pattern):
        client.predict(api_name="/generate", **values)


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"enable_lcm": "false"}, "enable_lcm='false': must be true or false"),
        ({"enhance_face_region": None}, "enhance_face_region=None: must be true or false"),
        ({"adapter_strength": "0.5"}, r"adapter_strength='0.5': must be a number, not str"),
        ({"seed": 3.7}, r"seed=3.7: must be an integer in 0..2147483647"),
        ({"controlnets": {"canny": "0.4"}}, r"controlnets\[canny\]='0.4': must be a number"),
    ],
)
def test_engine_refuses_loose_types(tiny_engine, photos: dict[str, Path], fields: dict, pattern: str) -> None:
    """The command line and Python callers get the same strict reading (Request checks itself)."""
    with pytest.raises(errors.InvalidParameter, match=pattern):
        tiny_engine.prepare(engine_request(str(photos["astronaut"]), **fields))


# --- 3c. command-line paths: checked before any model loads ----------------------------------------


def test_cli_bad_paths_exit_2_before_loading(cli_main, photos: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import instantid.engine as engine_mod

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was asked for before the paths were checked")

    monkeypatch.setattr(engine_mod, "get_engine", no_loading)
    face = str(photos["astronaut"])
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    cases = [
        (["--face", face, "--out", str(tmp_path)], "is a folder; name a .png file in it"),
        (["--face", face, "--out", "/proc/instantid-out.png"], "cannot write there"),
        (["--face", face, "--out", str(a_file / "o.png")], "does not exist"),
        (["--face", str(tmp_path), "--out", str(tmp_path / "o.png")], "is a folder; name a photo file"),
        (["--face", "/dev/null", "--out", str(tmp_path / "o.png")], "is not a regular file"),
        (["--face", face, "--pose", str(tmp_path), "--out", str(tmp_path / "o.png")], "is a folder"),
    ]
    for args, message in cases:
        assert_clean_refusal(cli_main("generate", *args), message)
    assert not (tmp_path / "o.png").exists() and not Path("/proc/instantid-out.png").exists()


# --- 3d. memory: a large upload, refused or not, gives its memory back -----------------------------

RSS_SCRIPT = """
import json, os, sys, threading
import psutil
from instantid.engine import Engine
from instantid.request.requests import Request
from instantid.settings import Settings
from tests import hostile

engine = Engine(Settings.from_env({"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": sys.argv[1]}))
uploads = [hostile.rgba16_huge_png(), hostile.very_large(), hostile.encode(
    hostile.Image.new("CMYK", (7000, 7000), (10, 20, 30, 40)), "JPEG", quality=80)]
process = psutil.Process()

def prepare(data):
    try:
        engine.prepare(Request(face_images=[data]))
    except Exception:
        pass

def in_a_new_thread(data):  # as Gradio serves each request from a worker thread
    t = threading.Thread(target=prepare, args=(data,))
    t.start()
    t.join()

in_a_new_thread(hostile.encode(hostile.astronaut(), "PNG"))  # models loaded, caches warm
idle = process.memory_info().rss
after = []
for _ in range(2):
    for data in uploads:
        in_a_new_thread(data)
        after.append(process.memory_info().rss - idle)
print(json.dumps(after))
"""


@pytest.mark.slow  # its own process, an engine and six 35-49 MP decodes
def test_large_uploads_give_their_memory_back(tiny_cache: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(apprunner.ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tiny_cache)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=apprunner.ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    growth = json.loads(r.stdout.strip().splitlines()[-1])
    # Six 35-49 megapixel uploads (16-bit RGBA, RGB, CMYK), each in its own thread: without handing freed
    # memory back this grew by 0.6-1.5 GB per upload.
    assert max(growth) < 100 * 2**20, [f"{g / 2**20:.0f} MB" for g in growth]


# --- 4. faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["base_repo", "ip_adapter_file"])
def test_missing_checkpoint_is_named_and_a_later_request_retries(
    tiny_settings, tiny_cache: Path, photos: dict[str, Path], tmp_path: Path, missing: str
) -> None:
    """The Hub is unreachable (offline) and the cache lacks a repo or a file: a clear error, then recovery."""
    from instantid.engine import Engine
    from instantid.models.hub import cached_snapshot, publish_folder
    from instantid.settings import TINY_BASE_MODEL, TINY_INSTANTID_REPO

    cache = tmp_path / "hub"
    iid = cached_snapshot(tiny_cache, TINY_INSTANTID_REPO)
    if missing == "base_repo":
        publish_folder(cache, "acme/instantid", iid)
        expected = ["acme/later-sdxl", "not in the local Hugging Face cache"]
    else:
        publish_folder(cache, "acme/later-sdxl", cached_snapshot(tiny_cache, TINY_BASE_MODEL))
        partial = tmp_path / "partial"
        partial.mkdir()
        (partial / "ControlNetModel").symlink_to(iid / "ControlNetModel", target_is_directory=True)
        publish_folder(cache, "acme/instantid", partial)
        expected = ["acme/instantid", "ip-adapter.bin"]
    settings = replace(
        tiny_settings,
        preset="real",
        base_model="acme/later-sdxl",
        instantid_repo="acme/instantid",
        hub_cache=cache,
        face_models=str(tiny_cache / "face-models"),
    )
    engine = Engine(settings)
    with pytest.raises(errors.CheckpointError) as caught:
        engine.run(engine_request(str(photos["astronaut"])))
    assert all(word in str(caught.value) for word in expected), str(caught.value)
    assert engine.state["phase"] == "error" and "retries" in engine.state["message"]

    # The missing piece arrives (the network is back, or the operator fills the cache): same engine, no restart.
    if missing == "base_repo":
        publish_folder(cache, "acme/later-sdxl", cached_snapshot(tiny_cache, TINY_BASE_MODEL))
    else:
        publish_folder(cache, "acme/instantid", iid)
    result = engine.run(engine_request(str(photos["astronaut"])))
    assert len(result.images) == 1 and engine.state["phase"] == "ready"


class FlakyPipe:
    """Stands in for the pipeline: raises CUDA out-of-memory on the first `failures` calls, then delegates."""

    def __init__(self, pipe: Any, failures: int) -> None:
        self._pipe = pipe
        self.failures = failures
        self.calls = 0
        self.held: list[weakref.ref] = []
        self.held_alive_at_retry: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        self.calls += 1
        self.held_alive_at_retry += [ref() is not None for ref in self.held]
        if self.failures > 0:
            self.failures -= 1
            activations = torch.zeros(1024)  # what a failed attempt holds until its frames die
            self.held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
        return self._pipe(*args, **kwargs)


@pytest.fixture(scope="module")
def spare_engine(tiny_settings):
    """A second loaded engine, so that faults injected here never touch the shared one."""
    from instantid.engine import Engine

    engine = Engine(tiny_settings)
    engine.ensure_loaded()
    return engine


@pytest.fixture
def gpu_like(spare_engine, monkeypatch: pytest.MonkeyPatch):
    """The spare engine pretending to run the `large` GPU profile; placement calls are recorded, not run."""
    import instantid.engine as engine_mod
    from instantid.models.memory import PROFILES

    placed: list[str] = []
    freed: list[int] = []
    monkeypatch.setattr(engine_mod, "apply_profile", lambda pipe, profile: placed.append(profile.name))
    monkeypatch.setattr(spare_engine, "profile", PROFILES["large"])
    monkeypatch.setattr(spare_engine, "profile_reason", "test")
    real_free = spare_engine._free_cuda
    monkeypatch.setattr(spare_engine, "_free_cuda", lambda: (freed.append(1), real_free()))
    monkeypatch.setattr(spare_engine, "pipe", spare_engine.pipe)  # restored after the test
    return spare_engine, placed, freed


def test_oom_frees_and_retries_once_with_a_leaner_profile(gpu_like, photos: dict[str, Path]) -> None:
    engine, placed, freed = gpu_like
    reference = engine.run(engine_request(str(photos["astronaut"]), seed=5))
    flaky = FlakyPipe(engine.pipe, failures=1)
    engine.pipe = flaky
    result = engine.run(engine_request(str(photos["astronaut"]), seed=5))
    assert flaky.calls == 2 and placed == ["medium"] and freed
    assert flaky.held_alive_at_retry == [False], "the failed attempt's tensors must be freed before the retry"
    assert engine.profile.name == "medium" and "switched to medium" in engine.profile_reason
    assert result.profile == "medium"
    assert np.array_equal(pixels(result), pixels(reference)), "the retry returns the same image"


def test_oom_twice_is_a_clear_error_and_the_engine_serves_on(gpu_like, photos: dict[str, Path]) -> None:
    engine, placed, freed = gpu_like
    real = engine.pipe
    engine.pipe = FlakyPipe(real, failures=2)
    with pytest.raises(errors.OutOfMemoryError, match="ran out of memory.*medium profile.*smaller size"):
        engine.run(engine_request(str(photos["astronaut"])))
    assert placed == ["medium"] and len(freed) == 2
    engine.pipe = real
    assert len(engine.run(engine_request(str(photos["astronaut"]))).images) == 1


def test_oom_without_a_leaner_profile_is_a_clear_error(gpu_like, photos: dict[str, Path]) -> None:
    from instantid.models.memory import PROFILES

    engine, placed, _ = gpu_like
    engine.profile = PROFILES["zerogpu"]
    flaky = FlakyPipe(engine.pipe, failures=1)
    engine.pipe = flaky
    with pytest.raises(errors.OutOfMemoryError, match="zerogpu profile, no leaner one.*fewer images"):
        engine.run(engine_request(str(photos["astronaut"])))
    assert flaky.calls == 1 and placed == []


def _hook_counts(pipe: Any) -> dict[str, int]:
    counts = {}
    for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "resampler"):
        module = getattr(pipe, name)
        counts[name] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    return counts


class Injected(Exception):
    pass


def test_an_exception_mid_request_never_poisons_the_shared_pipeline(tiny_engine, photos: dict[str, Path]) -> None:
    from diffusers import ControlNetModel

    face = str(photos["astronaut"])
    baseline = pixels(tiny_engine.run(engine_request(face, num_steps=2, seed=11)))
    hooks = _hook_counts(tiny_engine.pipe)

    # 1. The caller's progress callback raises after the first step (a request with other switches on).
    def explode(step: int, total: int) -> None:
        if step >= 1:
            raise Injected

    with pytest.raises(Injected):
        tiny_engine.run(
            engine_request(face, num_steps=3, adapter_strength=0.2, controlnets={"canny": 0.5}, enable_lcm=False,
                           scheduler="DPMSolverMultistepScheduler-Karras"),
            progress=explode,
        )
    # 2. The UNet itself fails in the middle of denoising.
    unet = tiny_engine.pipe.unet
    calls = {"n": 0}
    real_forward = unet.forward

    def failing_forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure inside the UNet")
        return real_forward(*args, **kwargs)

    unet.forward = failing_forward
    try:
        with pytest.raises(RuntimeError, match="injected"):
            tiny_engine.run(
                engine_request(face, num_steps=3, enhance_face_region=False, controlnets={"depth": 0.4})
            )
    finally:
        del unet.forward  # back to the class's own method

    assert type(tiny_engine.pipe.controlnet) is ControlNetModel, "the per-call MultiControlNet was put back"
    assert _hook_counts(tiny_engine.pipe) == hooks, "no per-call hook outlives its call"
    assert np.array_equal(pixels(tiny_engine.run(engine_request(face, num_steps=2, seed=11))), baseline)


# A minute or more of denoising on two cores: long enough that a worker that is not freed shows.
LONG_JOB = {"num_steps": 100, "width": 512, "height": 512}
STOPPED = "generation stopped: the client cancelled or disconnected"  # logged by instantid.frontends.api


def _wait_for_denoising(job: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        update = job.status()
        if update.progress_data and update.progress_data[-1].desc == "Denoising" and update.progress_data[-1].index:
            return
        time.sleep(0.05)
    pytest.fail("the long job never reported denoising progress")


def _next_request_seconds(client: Client, photos: dict[str, Path]) -> float:
    t0 = time.monotonic()
    job = client.submit(handle_file(str(photos["astronaut"])), "a portrait", api_name="/generate", **FAST)
    gallery, *_ = job.result(timeout=120)
    assert len(gallery) == 1
    return time.monotonic() - t0


def test_api_cancel_frees_the_worker(app: apprunner.App, photos: dict[str, Path]) -> None:
    stopped = app.log_text().count(STOPPED)
    client = Client(app.url, verbose=False)
    job = client.submit(handle_file(str(photos["astronaut"])), "a portrait", api_name="/generate", **LONG_JOB)
    _wait_for_denoising(job)
    assert job.cancel()
    seconds = _next_request_seconds(Client(app.url, verbose=False), photos)
    assert app.log_text().count(STOPPED) == stopped + 1, "the cancelled generation ran on"
    assert seconds < 30, f"the next request waited {seconds:.0f} s: the cancelled generation kept the pipeline"


def test_api_disconnect_frees_the_worker(app: apprunner.App, photos: dict[str, Path]) -> None:
    stopped = app.log_text().count(STOPPED)
    client = Client(app.url, verbose=False)
    base = app.url + "gradio_api"
    dep = next(d for d in client.config["dependencies"] if d.get("api_name") == "generate")
    session = uuid.uuid4().hex
    payload = generate_payload(client, face_image=upload(client, photos["astronaut"]), **LONG_JOB)
    body = {**payload, "fn_index": dep["id"], "session_hash": session}
    httpx.post(f"{base}/queue/join", json=body, timeout=30).raise_for_status()
    with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if '"Denoising"' in line:
                break  # the client vanishes in the middle of denoising
    seconds = _next_request_seconds(client, photos)
    assert app.log_text().count(STOPPED) == stopped + 1, "the abandoned generation ran on"
    assert seconds < 30, f"the next request waited {seconds:.0f} s: the abandoned generation kept the pipeline"


# --- 6. trust ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint does to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import torch

    from instantid.models.loading import load_ip_adapter_file

    marker = tmp_path / "pwned"
    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": _Payload(marker), "ip_adapter": {}}, path)
    with pytest.raises(errors.CheckpointError, match="could not be read safely"):
        load_ip_adapter_file(path)
    assert not marker.exists()


def test_only_safe_checkpoint_loaders_in_the_package() -> None:
    for path in sorted((apprunner.ROOT / "instantid").glob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.index("\n", match.start())]
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"\bpickle\.loads?\(|trust_remote_code=True|(?<![.\w])(eval|exec)\(", text), path.name


def test_no_secrets_in_logs_or_status(app: apprunner.App, client: Client) -> None:
    report = client.predict(api_name="/status")
    config = httpx.get(app.url + "config", timeout=10).text
    for text, where in ((json.dumps(report), "status report"), (config, "page config"), (app.log_text(), "log")):
        assert SECRET not in text, f"the token leaked into the {where}"


def test_uploads_stay_in_gradio_temp_and_are_cleaned(
    app: apprunner.App, client: Client, photos: dict[str, Path], tiny_settings: Any,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Uploads land only in Gradio's temp folder, and the app's own Blocks deletes them on a schedule."""
    from instantid.frontends import api, ui

    marker = photos["hanks"]
    client.predict(handle_file(str(marker)), "a portrait", api_name="/generate", **FAST)
    assert [p for p in app.temp_dir.rglob(marker.name) if p.is_file()], "the upload is in Gradio's temp folder"

    demo = ui.build_demo({"generate": api.generate}, api.status, settings=tiny_settings)
    assert demo.delete_cache, "gr.Blocks(delete_cache=...) must be set, or uploads pile up on the Space's disk"
    frequency, age = demo.delete_cache
    assert 0 < frequency <= 3600 and 0 < age <= 86400

    # The same Blocks on a one-second schedule, in this process: an upload is gone within seconds.
    monkeypatch.setattr(ui, "DELETE_CACHE", (1, 1))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = ui.build_demo({"generate": api.generate}, api.status, settings=tiny_settings)
    port = apprunner.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with marker.open("rb") as fh:
            r = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": fh}, timeout=30)
        stored = Path(r.json()[0])
        assert stored.is_file() and stored.is_relative_to(tmp_path / "gradio")
        deadline = time.monotonic() + 15
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not stored.exists(), "the upload was not deleted on the Blocks' schedule"
    finally:
        demo.close()
