"""`python -m instantid` as a user runs it: real subprocesses, offline, on the tiny preset."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import pytest

from instantid.declaration import DEFAULT_PROMPT
from instantid.models.hub import publish_folder
from instantid.models.tiny import ModelShape, build_parts, write_instantid, write_sdxl


def cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instantid", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


# Every test here reads whole `python -m instantid` processes (their exit status, their stdout, their stderr with
# any library noise), and most of a process's time is imports on one core: run one after the other, a 2-core
# machine kept a core idle. So each test declares its processes (`@processes`), one module fixture runs those of
# the selected tests a few at a time, and each test asserts on its own. Same processes, same assertions.
WORKERS = 3


@dataclass
class Job:
    argv: list[str]
    folder: Path  # the job's own folder: its --out and the files it made
    env: dict[str, str] | None = None  # None: tiny_env
    before: dict[Path, bytes] = field(default_factory=dict)  # photos that must be unchanged after the run


@dataclass
class Setup:
    """What a test's processes are made from."""

    env: dict[str, str]
    photos: dict[str, Path]
    face_models_dir: Path
    tmp: pytest.TempPathFactory

    def folder(self, name: str) -> Path:
        return self.tmp.mktemp(name.replace(":", "-"))

    def names(self, folder: Path, **more: str) -> dict[str, str]:
        """What an error table's `{name}` fields stand for: the test photos, and `missing` (no such file)."""
        return {**{k: str(v) for k, v in self.photos.items()}, "missing": str(folder / "nope.jpg"), **more}


@dataclass
class Runs:
    jobs: dict[str, Job]
    results: dict[str, subprocess.CompletedProcess[str]]

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.results[name]


JOBS: dict[str, tuple[Callable[[Setup], dict[str, Job]], str | None]] = {}


def processes(
    make: Callable[[Setup], dict[str, Job]], per_case: str | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the processes a test reads (by name, from the `runs` fixture); `per_case`: a parametrized test's
    case `index` reads the job `<per_case>:<index>` alone."""
    def register(test: Callable[..., None]) -> Callable[..., None]:
        JOBS[test.__name__] = (make, per_case)
        return test

    return register


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tiny_env, photos, face_models_dir, tmp_path_factory) -> Runs:
    """The processes of this module's selected tests, run `WORKERS` at a time (the generations first, so the
    quick refusals fill in beside them)."""
    items = [item for item in request.session.items if item.module is request.module]
    setup = Setup(tiny_env, photos, face_models_dir, tmp_path_factory)
    jobs: dict[str, Job] = {}
    for test, (make, per_case) in JOBS.items():
        cases = [item for item in items if item.originalname == test]
        if cases:
            wanted = None if per_case is None else {f"{per_case}:{item.callspec.params['index']}" for item in cases}
            jobs.update({name: job for name, job in make(setup).items() if wanted is None or name in wanted})
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda job: cli(job.env or tiny_env, *job.argv), jobs.values())
        return Runs(jobs, dict(zip(jobs, results, strict=True)))


def _generate(s: Setup) -> dict[str, Job]:
    folder = s.folder("generate")
    argv = ["generate", "--face", str(s.photos["astronaut"]), "--face", str(s.photos["astronaut_flipped"]),
            "--prompt", "a knight", "--out", str(folder / "out.png"), "--steps", "2", "--seed", "3",
            "--num-images", "2", "--controlnet", "canny=0.5", "--json"]
    return {"generate": Job(argv, folder)}


@processes(_generate)
def test_generate_writes_pngs(runs: Runs) -> None:
    r = runs["generate"]
    assert r.returncode == 0, r.stderr
    # The result alone: no library advice, loading bars or progress bars.
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1, r.stderr
    summary = json.loads(r.stdout)
    assert summary["seed"] == 3 and len(summary["images"]) == 2
    for path in summary["images"]:
        with PIL.Image.open(path) as im:
            assert im.format == "PNG" and im.size == tuple(summary["size"])


def _speeds(s: Setup) -> dict[str, Job]:
    folder, face = s.folder("speed"), str(s.photos["astronaut"])
    return {
        "speed:turbo": Job(["generate", "--face", face, "--prompt", "a knight", "--speed", "turbo", "--seed", "3",
                            "--out", str(folder / "turbo.png"), "--json"], folder),
        "speed:lcm": Job(["generate", "--face", face, "--speed", "fast", "--lcm", "--out", str(folder / "x.png")],
                         folder),
    }


@processes(_speeds)
def test_speed_flag(runs: Runs) -> None:
    r = runs["speed:turbo"]
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["guidance"] == 1.0  # turbo's own
    r = runs["speed:lcm"]
    assert r.returncode == 2 and "switch LCM off" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _restyle_and_swap(s: Setup) -> dict[str, Job]:
    folder = s.folder("modes")
    common = ["--face", str(s.photos["astronaut"]), "--steps", "2", "--seed", "5", "--json"]
    return {
        "restyle": Job(["restyle", *common, "--source", str(s.photos["hanks"]), "--strength", "0.5",
                        "--out", str(folder / "restyled.png")], folder),
        "swap": Job(["swap", *common, "--target", str(s.photos["group"]), "--face-index", "2",
                     "--out", str(folder / "swapped.png")], folder),
    }


@processes(_restyle_and_swap)
def test_restyle_and_swap_round_trips(runs: Runs, photos) -> None:
    r = runs["restyle"]
    assert r.returncode == 0, r.stderr
    # No prompt: our own warning is all that stderr holds (the libraries' are silenced, ours are not).
    assert r.stderr.splitlines() == [f"warning: Empty prompt: used '{DEFAULT_PROMPT}'."], r.stderr
    summary = json.loads(r.stdout)
    with PIL.Image.open(summary["images"][0]) as im:
        assert im.format == "PNG" and im.size == tuple(summary["size"])
    r = runs["swap"]
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    with PIL.Image.open(summary["images"][0]) as im, PIL.Image.open(photos["group"]) as target:
        assert im.size == target.size == tuple(summary["size"])  # the whole target photo comes back
    assert summary["faces_found"] == 1


def _group(s: Setup) -> dict[str, Job]:
    folder = s.folder("group")
    argv = ["group", "--person", str(s.photos["astronaut"]), "--person", str(s.photos["hanks"]),
            str(s.photos["astronaut_flipped"]), "--names", "Ada, Ben", "--order", "2,1", "--prompt", "two friends",
            "--steps", "2", "--seed", "4", "--out", str(folder / "group.png"), "--json"]
    return {"group": Job(argv, folder)}


@processes(_group)
def test_group_round_trip(runs: Runs) -> None:
    r = runs["group"]
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 4 and summary["similarities"] == [{"Ada": None, "Ben": None}]
    with PIL.Image.open(runs.jobs["group"].folder / "group.png") as im:
        assert im.size == tuple(summary["size"]) and im.width > im.height  # side by side


def _refine(s: Setup) -> dict[str, Job]:
    folder = s.folder("refine")
    argv = ["generate", "--face", str(s.photos["astronaut"]), "--pose", str(s.photos["group"]), "--prompt",
            "a portrait", "--refine-faces", "on", "--steps", "2", "--seed", "4", "--out", str(folder / "r.png"),
            "--json"]
    return {"refine": Job(argv, folder)}


@processes(_refine)
def test_refine_faces_flag(runs: Runs) -> None:
    r = runs["refine"]
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["refined"] == ["the face"] and "refine_ms" in summary["timings_ms"]
    assert "warning: Refined small face(s), re-rendered at working size: the face." in r.stderr


def _any_checkpoint(s: Setup) -> dict[str, Job]:
    """Checkpoints of other shapes, published under the user's repo ids (built here, before the runs)."""
    tmp = s.folder("any-checkpoint")
    shape = ModelShape.tiny(cross_attention_dim=96, text_hidden=48, dim=128, depth=2, heads=2, num_queries=8, ff_mult=4)
    cache = tmp / "hub"
    parts = build_parts(shape)
    write_sdxl(tmp / "sdxl", parts)
    write_instantid(tmp / "iid", parts, shape)
    publish_folder(cache, "acme/my-sdxl", tmp / "sdxl")
    publish_folder(cache, "acme/my-instantid", tmp / "iid")
    env = {k: v for k, v in s.env.items() if not k.startswith("INSTANTID_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(cache),
            "INSTANTID_BASE_MODEL": "acme/my-sdxl",
            "INSTANTID_REPO": "acme/my-instantid",
            "INSTANTID_FACE_MODELS": str(s.face_models_dir),
        }
    )
    out, face = tmp / "o.png", str(s.photos["astronaut"])
    return {
        "any-checkpoint": Job(["generate", "--face", face, "--out", str(out), "--steps", "2", "--width", "128",
                               "--height", "192", "--seed", "1", "--json"], tmp, env),
        # A repo id that is not in the cache.
        "any-checkpoint:missing": Job(["generate", "--face", face, "--out", str(tmp / "o2.png"), "--steps", "2"],
                                      tmp, {**env, "INSTANTID_REPO": "acme/not-there"}),
    }


@processes(_any_checkpoint)
def test_any_checkpoint_set_under_any_repo_ids(runs: Runs) -> None:
    """Offline with no preset set: checkpoints of other shapes, published under the user's repo ids, are loaded
    as they are (never swapped for the tiny preset)."""
    r = runs["any-checkpoint"]
    assert r.returncode == 0, r.stderr
    with PIL.Image.open(runs.jobs["any-checkpoint"].folder / "o.png") as im:
        assert im.size == (128, 192)
    # A repo id that is not in the cache: exit 2 naming it, no traceback.
    r = runs["any-checkpoint:missing"]
    assert r.returncode == 2 and "acme/not-there" in r.stderr and "Traceback" not in r.stderr
    # No preset was asked for: the error says how to try the command line offline anyway.
    assert "INSTANTID_PRESET=tiny" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def _faces(s: Setup) -> dict[str, Job]:
    folder, group = s.folder("faces"), str(s.photos["group"])
    return {
        "faces": Job(["faces", group], folder),
        "faces:folder": Job(["faces", str(folder)], folder),
        "faces:json": Job(["faces", "--json", group], folder),
    }


@processes(_faces)
def test_faces_lists_largest_first(runs: Runs) -> None:
    r = runs["faces"]
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # One readable line per face, numbered as swap's --face-index takes them.
    head, *rows = r.stdout.splitlines()
    assert head.startswith("6 face(s), largest first") and len(rows) == 6, r.stdout
    for index, row in enumerate(rows):
        assert re.fullmatch(rf"{index}: \d+x\d+ px at \d+,\d+-\d+,\d+, score [01]\.\d\d; left-eye .* mouth-right "
                            r"-?\d+,-?\d+", row), row
    r, folder = runs["faces:folder"], runs.jobs["faces:folder"].folder
    assert r.returncode == 2 and r.stderr == f"error: {folder}: is a folder; name a photo file.\n", r.stderr
    r = runs["faces:json"]
    assert r.returncode == 0, r.stderr
    faces = json.loads(r.stdout)
    assert len(faces) == 6
    areas = [(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert all(len(f["kps"]) == 5 and 0 < f["score"] <= 1 for f in faces)


@processes(lambda s: {"status": Job(["status"], s.folder("status"))})
def test_status_is_the_memory_report(runs: Runs) -> None:
    r = runs["status"]
    assert r.returncode == 0, r.stderr
    # It says whose report this is: its own fresh process, not a running app's.
    assert "this command's own new process" in r.stderr and "/status" in r.stderr, r.stderr
    report = json.loads(r.stdout)
    assert {"host", "gpu", "components", "profile", "state"} <= set(report)
    assert report["state"]["phase"] == "not loaded" and report["host"]["process_rss"] > 0


def _without_the_hub(s: Setup) -> dict[str, Job]:
    folder = s.folder("no-hub")
    with socket.socket() as sock:  # a port nobody listens on: the Hub "cannot be reached"
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in s.env.items() if k not in ("HF_HUB_OFFLINE", "INSTANTID_PRESET")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(folder / "empty-cache"))
    return {"no-hub": Job(["generate", "--face", str(s.photos["astronaut"]), "--out", str(folder / "o.png")],
                          folder, env)}


@processes(_without_the_hub)
def test_without_the_hub_and_without_hf_hub_offline_it_says_so_at_once(runs: Runs) -> None:
    """No Hub and no HF_HUB_OFFLINE=1: one quick probe, not huggingface_hub's five retries (about 25 s), and a
    message that names the variable."""
    r = runs["no-hub"]
    assert r.returncode == 2, r.stderr
    assert "the Hub cannot be reached" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr, r.stderr
    assert "INSTANTID_PRESET=tiny" in r.stderr, r.stderr
    assert "Retrying" not in r.stderr, "huggingface_hub's retries ran"


# --- refusals ------------------------------------------------------------------------------------------


GROUP_ERRORS = [
    (["--person", "{astronaut}", "--person", "{noface}", "--names", "Ada,Ben"], "No face found in the photo of"),
    (["--person", "{astronaut}", "--person", "{hanks}", "--layout", "{astronaut}"], "layout photo has 1 face(s)"),
    (["--person", "{astronaut}"] * 5, "5 people: a group portrait holds at most 4"),
    (["--person", "{astronaut}", "--names", "Ada,Ben"], "No photo of Ben (person 2)"),
    (["--person", "{astronaut}", "--person", "{missing}"], "no such file"),
    (["--names", "Ada"], "--person"),
]


def _group_errors(s: Setup) -> dict[str, Job]:
    jobs = {}
    for i, (args, _) in enumerate(GROUP_ERRORS):
        folder = s.folder(f"group-error:{i}")
        names = s.names(folder)
        argv = ["group", *[a.format(**names) for a in args], "--out", str(folder / "o.png"), "--steps", "2"]
        jobs[f"group-error:{i}"] = Job(argv, folder)
    return jobs


@processes(_group_errors, per_case="group-error")
@pytest.mark.parametrize(("index", "message"), [(i, m) for i, (_, m) in enumerate(GROUP_ERRORS)])
def test_group_errors_exit_2(runs: Runs, index: int, message: str) -> None:
    r = runs[f"group-error:{index}"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def _group_out(s: Setup) -> dict[str, Job]:
    folder = s.folder("group-out")
    ben = folder / "ben.png"
    shutil.copyfile(s.photos["hanks"], ben)
    argv = ["group", "--person", str(s.photos["astronaut"]), "--person", str(ben), "--out", str(ben)]
    return {"group-out": Job(argv, folder)}


@processes(_group_out)
def test_group_out_never_overwrites_a_person_photo(runs: Runs) -> None:
    r = runs["group-out"]
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


def _mode_errors(s: Setup) -> dict[str, Job]:
    jobs = {}
    for i, (args, _) in enumerate(MODE_ERRORS):
        folder = s.folder(f"mode-error:{i}")
        names = s.names(folder)
        argv = [*[a.format(**names) for a in args], "--face", str(s.photos["astronaut"])]
        jobs[f"mode-error:{i}"] = Job([*argv, "--out", str(folder / "o.png"), "--steps", "2"], folder)
    return jobs


@processes(_mode_errors, per_case="mode-error")
@pytest.mark.parametrize(("index", "message"), [(i, m) for i, (_, m) in enumerate(MODE_ERRORS)])
def test_restyle_and_swap_errors_exit_2(runs: Runs, index: int, message: str) -> None:
    r = runs[f"mode-error:{index}"]
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


def _overwrites(s: Setup) -> dict[str, Job]:
    jobs = {}
    for i, (mode, out, _) in enumerate(OVERWRITES):
        tmp_path = s.folder(f"overwrite:{i}")
        face, target, source = tmp_path / "face.png", tmp_path / "target.png", tmp_path / "source.png"
        PIL.Image.open(s.photos["astronaut"]).save(face)
        PIL.Image.open(s.photos["group"]).save(target)
        PIL.Image.open(s.photos["hanks"]).save(source)
        PIL.Image.open(s.photos["hanks"]).save(tmp_path / "pose_1.png")
        (tmp_path / "sub").mkdir()
        (tmp_path / "link.png").symlink_to(face)
        names = {"target": target, "sub": tmp_path / "sub", "face": face, "link": tmp_path / "link.png",
                 "source": source, "pose": tmp_path / "pose.png"}
        out_path = Path(out.format(**names))
        before = {p: p.read_bytes() for p in tmp_path.glob("*.png") if not p.is_symlink()}
        argv = [mode, "--face", str(face), "--prompt", "x", "--steps", "2", "--out", str(out_path)]
        argv += {"swap": ["--target", str(target)], "restyle": ["--source", str(source)],
                 "generate": ["--pose", str(tmp_path / "pose_1.png"), "--num-images", "2"]}[mode]
        jobs[f"overwrite:{i}"] = Job(argv, tmp_path, before=before)
    return jobs


@processes(_overwrites, per_case="overwrite")
@pytest.mark.parametrize(("index", "flag"), [(i, flag) for i, (*_, flag) in enumerate(OVERWRITES)])
def test_out_never_overwrites_an_input_photo(runs: Runs, index: int, flag: str) -> None:
    r, before = runs[f"overwrite:{index}"], runs.jobs[f"overwrite:{index}"].before
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "overwrite" in lines[0], r.stderr
    assert before and {p: p.read_bytes() for p in before} == before, "an input photo was changed"


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
    (["--face", "{astronaut}", "--framing", "close-up"], "--framing 'close-up': choose one of photo, portrait, half "
     "body, full body"),
    (["--face", "{astronaut}", "--head-yaw", "60"], "--head-yaw 60.0: must be a number in -45..45"),
]


def _user_errors(s: Setup) -> dict[str, Job]:
    jobs = {}
    for i, (args, _) in enumerate(USER_ERRORS):
        tmp_path = s.folder(f"user-error:{i}")
        notimage = tmp_path / "notes.png"
        notimage.write_text("this is not an image")
        names = s.names(tmp_path, notimage=str(notimage), newline=str(tmp_path / "a\nb.png"), tmp=str(tmp_path))
        argv = ["generate", *[a.format(**names) for a in args], "--out", str(tmp_path / "o.png"), "--steps", "2"]
        if "--steps" in args:
            argv = argv[:-2]
        jobs[f"user-error:{i}"] = Job(argv, tmp_path)
    return jobs


@processes(_user_errors, per_case="user-error")
@pytest.mark.parametrize(("index", "message"), [(i, m) for i, (_, m) in enumerate(USER_ERRORS)])
def test_user_errors_exit_2_with_one_line(runs: Runs, index: int, message: str) -> None:
    r = runs[f"user-error:{index}"]
    message = message.format(tmp=runs.jobs[f"user-error:{index}"].folder)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
