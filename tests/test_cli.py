"""`python -m instantid` as a user runs it: real subprocesses, offline, on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from instantid.hub import publish_folder
from instantid.tiny import ModelShape, build_parts, write_instantid, write_sdxl


def cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instantid", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_generate_writes_pngs(tiny_env, photos, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    r = cli(
        tiny_env,
        "generate",
        "--face",
        str(photos["astronaut"]),
        "--face",
        str(photos["astronaut_flipped"]),
        "--prompt",
        "a knight",
        "--out",
        str(out),
        "--steps",
        "2",
        "--seed",
        "3",
        "--num-images",
        "2",
        "--controlnet",
        "canny=0.5",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 3 and len(summary["images"]) == 2
    for path in summary["images"]:
        with PIL.Image.open(path) as im:
            assert im.format == "PNG" and im.size == tuple(summary["size"])


def test_restyle_and_swap_round_trips(tiny_env, photos, tmp_path: Path) -> None:
    common = ["--face", str(photos["astronaut"]), "--steps", "2", "--seed", "5", "--json"]
    r = cli(tiny_env, "restyle", *common, "--source", str(photos["hanks"]), "--strength", "0.5",
            "--out", str(tmp_path / "restyled.png"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    with PIL.Image.open(summary["images"][0]) as im:
        assert im.format == "PNG" and im.size == tuple(summary["size"])
    r = cli(tiny_env, "swap", *common, "--target", str(photos["group"]), "--face-index", "2",
            "--out", str(tmp_path / "swapped.png"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    with PIL.Image.open(summary["images"][0]) as im, PIL.Image.open(photos["group"]) as target:
        assert im.size == target.size == tuple(summary["size"])  # the whole target photo comes back
    assert summary["faces_found"] == 1


def test_group_round_trip(tiny_env, photos, tmp_path: Path) -> None:
    out = tmp_path / "group.png"
    r = cli(tiny_env, "group", "--person", str(photos["astronaut"]), "--person", str(photos["hanks"]),
            str(photos["astronaut_flipped"]), "--names", "Ada, Ben", "--order", "2,1", "--prompt", "two friends",
            "--steps", "2", "--seed", "4", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 4 and summary["similarities"] == [{"Ada": None, "Ben": None}]
    with PIL.Image.open(out) as im:
        assert im.size == tuple(summary["size"]) and im.width > im.height  # side by side


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--person", "{astronaut}", "--person", "{noface}", "--names", "Ada,Ben"], "No face found in the photo of"),
        (["--person", "{astronaut}", "--person", "{hanks}", "--layout", "{astronaut}"], "layout photo has 1 face(s)"),
        (["--person", "{astronaut}"] * 5, "5 people: a group portrait holds at most 4"),
        (["--person", "{astronaut}", "--names", "Ada,Ben"], "No photo of Ben (person 2)"),
        (["--person", "{astronaut}", "--person", "{missing}"], "no such file"),
        (["--names", "Ada"], "--person"),
    ],
)
def test_group_errors_exit_2(tiny_env, photos, tmp_path: Path, args: list[str], message: str) -> None:
    names = {**{k: str(v) for k, v in photos.items()}, "missing": str(tmp_path / "nope.jpg")}
    r = cli(tiny_env, "group", *[a.format(**names) for a in args], "--out", str(tmp_path / "o.png"), "--steps", "2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["swap", "--target", "{noface}"], "No face found in the photo to swap a face into"),
        (["swap", "--target", "{group}", "--face-index", "6"], "face_index=6: the photo has 6 face(s)"),
        (["swap", "--target", "{missing}"], "no such file"),
        (["swap"], "--target"),
        (["swap", "--target", "{group}", "--width", "128"], "unrecognized arguments: --width"),
        (["restyle", "--source", "{hanks}", "--strength", "1.5"], "strength=1.5"),
        (["restyle"], "--source"),
    ],
)
def test_restyle_and_swap_errors_exit_2(tiny_env, photos, tmp_path: Path, args: list[str], message: str) -> None:
    names = {**{k: str(v) for k, v in photos.items()}, "missing": str(tmp_path / "nope.jpg")}
    argv = [a.format(**names) for a in args] + ["--face", str(photos["astronaut"]), "--out", str(tmp_path / "o.png")]
    r = cli(tiny_env, *argv, "--steps", "2")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_faces_lists_largest_first(tiny_env, photos) -> None:
    r = cli(tiny_env, "faces", str(photos["group"]))
    assert r.returncode == 0, r.stderr
    faces = json.loads(r.stdout)
    assert len(faces) == 6
    areas = [(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert all(len(f["kps"]) == 5 and 0 < f["score"] <= 1 for f in faces)


def test_status_is_the_memory_report(tiny_env) -> None:
    r = cli(tiny_env, "status")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {"host", "gpu", "components", "profile", "state"} <= set(report)
    assert report["state"]["phase"] == "not loaded" and report["host"]["process_rss"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--face", "{noface}"], "No face found in the face photo"),
        (["--face", "{missing}"], "no such file"),
        (["--face", "{notimage}"], "face photo"),
        (["--face", "{astronaut}", "--steps", "1000"], "num_steps=1000"),
        (["--face", "{astronaut}", "--scheduler", "Nope"], "scheduler='Nope'"),
        (["--face", "{astronaut}", "--style", "Cubism"], "style='Cubism'"),
        (["--face", "{astronaut}", "--width", "100", "--height", "128"], "width=100"),
        (["--face", "{astronaut}", "--controlnet", "sketch"], "controlnets"),
        (["--face", "{astronaut}", "--identity-strength", "abc"], "--identity-strength"),
        (["--face", "{astronaut}", "--pose", "{noface}"], "pose photo"),
    ],
)
def test_user_errors_exit_2_with_one_line(tiny_env, photos, tmp_path: Path, args: list[str], message: str) -> None:
    notimage = tmp_path / "notes.png"
    notimage.write_text("this is not an image")
    names = {**{k: str(v) for k, v in photos.items()}, "missing": str(tmp_path / "nope.jpg"), "notimage": str(notimage)}
    argv = ["generate", *[a.format(**names) for a in args], "--out", str(tmp_path / "o.png"), "--steps", "2"]
    if "--steps" in args:
        argv = argv[:-2]
    r = cli(tiny_env, *argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_any_checkpoint_set_under_any_repo_ids(photos, face_models_dir, tmp_path: Path, tiny_env) -> None:
    """Offline with no preset set: checkpoints of other shapes, published under the user's repo ids, are loaded
    as they are (never swapped for the tiny preset)."""
    shape = ModelShape.tiny(cross_attention_dim=96, text_hidden=48, dim=128, depth=2, heads=2, num_queries=8, ff_mult=4)
    cache = tmp_path / "hub"
    parts = build_parts(shape)
    write_sdxl(tmp_path / "sdxl", parts)
    write_instantid(tmp_path / "iid", parts, shape)
    publish_folder(cache, "acme/my-sdxl", tmp_path / "sdxl")
    publish_folder(cache, "acme/my-instantid", tmp_path / "iid")
    env = {k: v for k, v in tiny_env.items() if not k.startswith("INSTANTID_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(cache),
            "INSTANTID_BASE_MODEL": "acme/my-sdxl",
            "INSTANTID_REPO": "acme/my-instantid",
            "INSTANTID_FACE_MODELS": str(face_models_dir),
        }
    )
    out = tmp_path / "o.png"
    r = cli(
        env,
        "generate",
        "--face",
        str(photos["astronaut"]),
        "--out",
        str(out),
        "--steps",
        "2",
        "--width",
        "128",
        "--height",
        "192",
        "--seed",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    with PIL.Image.open(out) as im:
        assert im.size == (128, 192)
    # A repo id that is not in the cache: exit 2 naming it, no traceback.
    env["INSTANTID_REPO"] = "acme/not-there"
    r = cli(env, "generate", "--face", str(photos["astronaut"]), "--out", str(out), "--steps", "2")
    assert r.returncode == 2 and "acme/not-there" in r.stderr and "Traceback" not in r.stderr


def test_without_the_hub_and_without_hf_hub_offline_it_says_so_at_once(tiny_env, photos, tmp_path: Path) -> None:
    """No Hub and no HF_HUB_OFFLINE=1: one quick probe, not huggingface_hub's five retries (about 25 s), and a
    message that names the variable."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: the Hub "cannot be reached"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in tiny_env.items() if k not in ("HF_HUB_OFFLINE", "INSTANTID_PRESET")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    r = cli(env, "generate", "--face", str(photos["astronaut"]), "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2, r.stderr
    assert "the Hub cannot be reached" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr, r.stderr
    assert "Retrying" not in r.stderr, "huggingface_hub's retries ran"
