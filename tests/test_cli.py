"""`python -m instantid` as a user runs it: real subprocesses, offline, on the tiny preset."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import pytest

from instantid.hub import publish_folder
from instantid.requests import DEFAULT_PROMPT
from instantid.tiny import ModelShape, build_parts, write_instantid, write_sdxl


def cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instantid", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


# The refusals below are each a whole `python -m instantid` process (its exit status and its one line of stderr,
# libraries' noise included, are what is tested), and most of their time is imports: one core each. The module
# runs them a few at a time from one fixture, so a 2-core machine runs two at once, and each test reads its own.
WORKERS = 3


@dataclass
class Job:
    argv: list[str]
    folder: Path  # the job's own folder: its --out and any files it made
    env: dict[str, str] | None = None  # None: tiny_env
    before: dict[Path, bytes] = field(default_factory=dict)  # photos that must be unchanged after the run


def run_jobs(env: dict[str, str], jobs: dict[str, Job]) -> dict[str, subprocess.CompletedProcess[str]]:
    def one(name: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        return name, cli(jobs[name].env or env, *jobs[name].argv)

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(pool.map(one, list(jobs)))


@dataclass
class Runs:
    jobs: dict[str, Job]
    results: dict[str, subprocess.CompletedProcess[str]]

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.results[name]


@pytest.fixture(scope="module")
def refusals(tiny_env, photos, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Every refusal of this module, each its own process in its own folder, run a few at a time."""
    def folder(name: str) -> Path:
        return tmp_path_factory.mktemp(name.replace(":", "-"))

    jobs: dict[str, Job] = {}
    for i, (args, _) in enumerate(USER_ERRORS):
        jobs[f"user:{i}"] = user_error_job(photos, folder(f"user:{i}"), args)
    for i, (args, _) in enumerate(GROUP_ERRORS):
        jobs[f"group:{i}"] = group_error_job(photos, folder(f"group:{i}"), args)
    for i, (args, _) in enumerate(MODE_ERRORS):
        jobs[f"mode:{i}"] = mode_error_job(photos, folder(f"mode:{i}"), args)
    for i, (mode, out, _) in enumerate(OVERWRITES):
        jobs[f"overwrite:{i}"] = overwrite_job(photos, folder(f"overwrite:{i}"), mode, out)
    return Runs(jobs, run_jobs(tiny_env, jobs))


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
    # The result alone: no library advice, loading bars or progress bars.
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1, r.stderr
    summary = json.loads(r.stdout)
    assert summary["seed"] == 3 and len(summary["images"]) == 2
    for path in summary["images"]:
        with PIL.Image.open(path) as im:
            assert im.format == "PNG" and im.size == tuple(summary["size"])


def test_speed_flag(tiny_env, photos, tmp_path: Path) -> None:
    r = cli(tiny_env, "generate", "--face", str(photos["astronaut"]), "--prompt", "a knight", "--speed", "turbo",
            "--seed", "3", "--out", str(tmp_path / "turbo.png"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["guidance"] == 1.0  # turbo's own
    r = cli(tiny_env, "generate", "--face", str(photos["astronaut"]), "--speed", "fast", "--lcm",
            "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "switch LCM off" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_restyle_and_swap_round_trips(tiny_env, photos, tmp_path: Path) -> None:
    common = ["--face", str(photos["astronaut"]), "--steps", "2", "--seed", "5", "--json"]
    r = cli(tiny_env, "restyle", *common, "--source", str(photos["hanks"]), "--strength", "0.5",
            "--out", str(tmp_path / "restyled.png"))
    assert r.returncode == 0, r.stderr
    # No prompt: our own warning is all that stderr holds (the libraries' are silenced, ours are not).
    assert r.stderr.splitlines() == [f"warning: Empty prompt: used '{DEFAULT_PROMPT}'."], r.stderr
    summary = json.loads(r.stdout)
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


def test_refine_faces_flag(tiny_env, photos, tmp_path: Path) -> None:
    r = cli(tiny_env, "generate", "--face", str(photos["astronaut"]), "--pose", str(photos["group"]), "--prompt",
            "a portrait", "--refine-faces", "on", "--steps", "2", "--seed", "4", "--out", str(tmp_path / "r.png"),
            "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["refined"] == ["the face"] and "refine_ms" in summary["timings_ms"]
    assert "warning: Refined small face(s), re-rendered at working size: the face." in r.stderr


GROUP_ERRORS = [
    (["--person", "{astronaut}", "--person", "{noface}", "--names", "Ada,Ben"], "No face found in the photo of"),
    (["--person", "{astronaut}", "--person", "{hanks}", "--layout", "{astronaut}"], "layout photo has 1 face(s)"),
    (["--person", "{astronaut}"] * 5, "5 people: a group portrait holds at most 4"),
    (["--person", "{astronaut}", "--names", "Ada,Ben"], "No photo of Ben (person 2)"),
    (["--person", "{astronaut}", "--person", "{missing}"], "no such file"),
    (["--names", "Ada"], "--person"),
]


def group_error_job(photos: dict[str, Path], folder: Path, args: list[str]) -> Job:
    names = {**{k: str(v) for k, v in photos.items()}, "missing": str(folder / "nope.jpg")}
    return Job(["group", *[a.format(**names) for a in args], "--out", str(folder / "o.png"), "--steps", "2"], folder)


@pytest.mark.parametrize(("index", "message"), [(i, m) for i, (_, m) in enumerate(GROUP_ERRORS)])
def test_group_errors_exit_2(refusals, index: int, message: str) -> None:
    r = refusals[f"group:{index}"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_group_out_never_overwrites_a_person_photo(tiny_env, photos, tmp_path: Path) -> None:
    ben = tmp_path / "ben.png"
    shutil.copyfile(photos["hanks"], ben)
    r = cli(tiny_env, "group", "--person", str(photos["astronaut"]), "--person", str(ben), "--out", str(ben))
    assert r.returncode == 2 and "is the --person photo" in r.stderr and "Traceback" not in r.stderr, r.stderr


MODE_ERRORS = [
    (["swap", "--target", "{noface}"], "No face found in the photo to swap a face into"),
    (["swap", "--target", "{group}", "--face-index", "6"], "--face-index 6: the photo has 6 face(s)"),
    (["swap", "--target", "{missing}"], "no such file"),
    (["swap"], "--target"),
    (["swap", "--target", "{group}", "--width", "128"],
     "unrecognized arguments: --width 128 (see python -m instantid swap --help)"),
    (["restyle", "--source", "{hanks}", "--strength", "1.5"], "--strength 1.5: must be a number in 0..1"),
    (["restyle"], "--source"),
]


def mode_error_job(photos: dict[str, Path], folder: Path, args: list[str]) -> Job:
    names = {**{k: str(v) for k, v in photos.items()}, "missing": str(folder / "nope.jpg")}
    argv = [a.format(**names) for a in args] + ["--face", str(photos["astronaut"]), "--out", str(folder / "o.png")]
    return Job([*argv, "--steps", "2"], folder)


@pytest.mark.parametrize(("index", "message"), [(i, m) for i, (_, m) in enumerate(MODE_ERRORS)])
def test_restyle_and_swap_errors_exit_2(refusals, index: int, message: str) -> None:
    r = refusals[f"mode:{index}"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


OVERWRITES = [
    ("swap", "{target}", "--target"),
    ("swap", "{sub}/../target.png", "--target"),
    ("swap", "{face}", "--face"),
    ("swap", "{link}", "--face"),  # a symlink to the face photo
    ("restyle", "{source}", "--source"),
    ("generate", "{pose}", "--pose"),  # two images: pose_1.png, the pose photo, would be written
]


def overwrite_job(photos: dict[str, Path], tmp_path: Path, mode: str, out: str) -> Job:
    face, target, source = tmp_path / "face.png", tmp_path / "target.png", tmp_path / "source.png"
    PIL.Image.open(photos["astronaut"]).save(face)
    PIL.Image.open(photos["group"]).save(target)
    PIL.Image.open(photos["hanks"]).save(source)
    PIL.Image.open(photos["hanks"]).save(tmp_path / "pose_1.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.png").symlink_to(face)
    names = {"target": target, "sub": tmp_path / "sub", "face": face, "link": tmp_path / "link.png",
             "source": source, "pose": tmp_path / "pose.png"}
    out_path = Path(out.format(**names))
    before = {p: p.read_bytes() for p in tmp_path.glob("*.png") if not p.is_symlink()}
    argv = [mode, "--face", str(face), "--prompt", "x", "--steps", "2", "--out", str(out_path)]
    argv += {"swap": ["--target", str(target)], "restyle": ["--source", str(source)],
             "generate": ["--pose", str(tmp_path / "pose_1.png"), "--num-images", "2"]}[mode]
    return Job(argv, tmp_path, before=before)


@pytest.mark.parametrize(("index", "flag"), [(i, flag) for i, (*_, flag) in enumerate(OVERWRITES)])
def test_out_never_overwrites_an_input_photo(refusals, index: int, flag: str) -> None:
    r, before = refusals[f"overwrite:{index}"], refusals.jobs[f"overwrite:{index}"].before
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "overwrite" in lines[0], r.stderr
    assert before and {p: p.read_bytes() for p in before} == before, "an input photo was changed"


def test_faces_lists_largest_first(tiny_env, photos, tmp_path: Path) -> None:
    r = cli(tiny_env, "faces", str(photos["group"]))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # One readable line per face, numbered as swap's --face-index takes them.
    head, *rows = r.stdout.splitlines()
    assert head.startswith("6 face(s), largest first") and len(rows) == 6, r.stdout
    for index, row in enumerate(rows):
        assert re.fullmatch(rf"{index}: \d+x\d+ px at \d+,\d+-\d+,\d+, score [01]\.\d\d; left-eye .* mouth-right "
                            r"-?\d+,-?\d+", row), row
    r = cli(tiny_env, "faces", str(tmp_path))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path}: is a folder; name a photo file.\n", r.stderr
    r = cli(tiny_env, "faces", "--json", str(photos["group"]))
    assert r.returncode == 0, r.stderr
    faces = json.loads(r.stdout)
    assert len(faces) == 6
    areas = [(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert all(len(f["kps"]) == 5 and 0 < f["score"] <= 1 for f in faces)


def test_status_is_the_memory_report(tiny_env) -> None:
    r = cli(tiny_env, "status")
    assert r.returncode == 0, r.stderr
    # It says whose report this is: its own fresh process, not a running app's.
    assert "this command's own new process" in r.stderr and "/status" in r.stderr, r.stderr
    report = json.loads(r.stdout)
    assert {"host", "gpu", "components", "profile", "state"} <= set(report)
    assert report["state"]["phase"] == "not loaded" and report["host"]["process_rss"] > 0


USER_ERRORS = [
    (["--face", "{noface}"], "No face found in the face photo"),
    (["--face", "{missing}"], "no such file"),
    (["--face", "{notimage}"], "face photo"),
    # Each refusal names the flag as the user typed it, not the API's parameter.
    (["--face", "{astronaut}", "--steps", "1000"], "--steps 1000: must be an integer in 0..100"),
    (["--face", "{astronaut}", "--lcm", "--steps", "60"], "--steps 60: use 1..50 with LCM"),
    (["--face", "{astronaut}", "--scheduler", "Nope"], "--scheduler 'Nope'"),
    (["--face", "{astronaut}", "--style", "Cubism"], "--style 'Cubism'"),
    (["--face", "{astronaut}", "--width", "100", "--height", "128"], "--width 100"),
    (["--face", "{astronaut}", "--width", "128"], "--width/--height 128 0: set both or neither"),
    (["--face", "{astronaut}", "--controlnet", "sketch"], "--controlnet 'sketch'"),
    (["--face", "{astronaut}", "--controlnet", "canny=2"], "--controlnet canny=2.0: must be a number in 0..1.5"),
    (["--face", "{astronaut}", "--wat"], "unrecognized arguments: --wat (see python -m instantid generate --help)"),
    (["--face", "{newline}"], "'{tmp}/a\\nb.png': no such file"),
    (["--face", "{tmp}"], "is a folder"),
    (["--face", "{astronaut}", "--identity-strength", "abc"], "--identity-strength"),
    (["--face", "{astronaut}", "--pose", "{noface}"], "pose photo"),
]


def user_error_job(photos: dict[str, Path], tmp_path: Path, args: list[str]) -> Job:
    notimage = tmp_path / "notes.png"
    notimage.write_text("this is not an image")
    names = {**{k: str(v) for k, v in photos.items()}, "missing": str(tmp_path / "nope.jpg"), "notimage": str(notimage),
             "newline": str(tmp_path / "a\nb.png"), "tmp": str(tmp_path)}
    argv = ["generate", *[a.format(**names) for a in args], "--out", str(tmp_path / "o.png"), "--steps", "2"]
    if "--steps" in args:
        argv = argv[:-2]
    return Job(argv, tmp_path)


@pytest.mark.parametrize(("index", "message"), [(i, m) for i, (_, m) in enumerate(USER_ERRORS)])
def test_user_errors_exit_2_with_one_line(refusals, index: int, message: str) -> None:
    r = refusals[f"user:{index}"]
    message = message.format(tmp=refusals.jobs[f"user:{index}"].folder)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


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
    # No preset was asked for: the error says how to try the command line offline anyway.
    assert "INSTANTID_PRESET=tiny" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


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
    assert "INSTANTID_PRESET=tiny" in r.stderr, r.stderr
    assert "Retrying" not in r.stderr, "huggingface_hub's retries ran"
