"""Command line: `python -m instantid generate | restyle | swap | group | faces | status | preload | bench`.

User errors (no face, bad value, missing checkpoint) exit with status 2 and one line on stderr; no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from ..declaration import DEFAULT_CONTROLNET_STRENGTH, MAX_PEOPLE, MODE_SPECS, MODES, params_for
from ..errors import CheckpointError, InvalidParameter, UserError
from ..request.requests import Request


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line on stderr and exit status 2, like the rest."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> None:  # type: ignore[override]
        # `prog` is "python -m instantid" or "python -m instantid generate": the help that explains the mistake.
        print(_one_line(f"error: {message} (see {self.prog} --help)"), file=sys.stderr)
        sys.exit(2)


def _one_line(text: str) -> str:
    """`text` with any newline or other control character (a path may hold one) written as its escape."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m instantid", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = {}

    for mode in MODES:
        g = p.commands[mode] = sub.add_parser(mode, help=MODE_SPECS[mode].command_help)
        _add_request_flags(g, mode)
        g.add_argument("--out", required=True, type=Path, help="output PNG; with --num-images N, _1.._N are added")
        g.add_argument("--json", action="store_true", help="print the result summary as JSON")

    f = p.commands["faces"] = sub.add_parser("faces", help="list the faces found in a photo, largest first")
    f.add_argument("path", type=Path)
    f.add_argument("--json", action="store_true", help="print them as one JSON list (bbox, kps, score)")

    p.commands["status"] = sub.add_parser(
        "status", help="print this command's own memory report as JSON (a running app's: its Status tab)"
    )
    sub.add_parser(
        "preload",
        help="print the Space front matter's preload_from_hub: the files the start-up loads, from each repo's listing",
    )

    b = p.commands["bench"] = sub.add_parser("bench", help="run a benchmark; the last output line is one JSON object")
    b.add_argument("name", choices=("load-memory", "overhead", "gpu", "cpu-contention", "preview", "framing"))
    b.add_argument("--quick", action="store_true", help="reduced sizes / fewer requests")
    b.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    return p


def _add_request_flags(g: argparse.ArgumentParser, mode: str) -> None:
    """One flag per parameter of `mode`, made from its declaration (`instantid.declaration.params_for`)."""
    for p in params_for(mode).values():
        if p.name == "person_1":
            # One flag for the four slots: repeated once per person, each time with that person's photo(s).
            g.add_argument("--person", dest="people", action="append", nargs="+", type=Path, required=True,
                           metavar="PHOTO", help="Photo(s) of one person (several are averaged); repeat --person "
                           "for each person, in person order (at most 4).")
        if p.flag is None:
            continue
        flag = p.flag or "--" + p.name.replace("_", "-")
        help_text = p.help.replace("%", "%%")
        if p.kind == "boolean":
            # A flag turns on what is off by default, or off what is on (--no-enhance-face-region).
            if p.default:
                g.add_argument("--no-" + flag[2:], dest=p.name, action="store_false", help="Off: " + help_text)
            else:
                g.add_argument(flag, dest=p.name, action="store_true", help=help_text)
        elif p.name == "face_image":
            g.add_argument(flag, dest=p.name, action="append", required=True, type=Path,
                           help=help_text + " Repeat for more photos of the same person (embeddings are averaged).")
        elif p.kind == "controls":
            g.add_argument(flag, dest=p.name, action="append", default=[], metavar="NAME[=STRENGTH]",
                           type=_control, help=help_text + " Repeat for more than one.")
        else:
            kind = {"image": Path, "integer": int, "number": float}.get(p.kind, str)
            # The photo a mode cannot do without (restyle's source, swap's target) is a required flag.
            needed = p.required and p.kind == "image"
            g.add_argument(flag, dest=p.name, type=kind, default=p.default, required=needed, help=help_text)


def _control(spec: str) -> tuple[str, float]:
    name, _, strength = spec.partition("=")
    try:
        return name.strip(), float(strength) if strength else DEFAULT_CONTROLNET_STRENGTH
    except ValueError:
        raise argparse.ArgumentTypeError(f"use NAME or NAME=STRENGTH, e.g. pose=0.4, not {spec!r}") from None


def _shown(path: Path | str) -> str:
    """A path as one line: quoted with escapes when it holds a newline or another control character."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _check_input(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{_shown(path)}: is a folder; name a photo file.")
    if not path.exists():
        raise UserError(f"{_shown(path)}: no such file.")
    if not path.is_file():
        raise UserError(f"{_shown(path)}: is not a regular file (a device or a pipe); name a photo file.")


def _check_out(out: Path) -> None:
    """--out must name a .png file we can create, in a folder that exists; tried for real, then removed."""
    if out.is_dir():
        raise UserError(f"--out {_shown(out)}: is a folder; name a .png file in it, e.g. {_shown(out / 'out.png')}.")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {_shown(out)}: use a .png file name.")
    if not out.parent.is_dir():
        raise UserError(f"--out {_shown(out)}: the folder {_shown(out.parent)} does not exist.")
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as exc:
        raise UserError(f"--out {_shown(out)}: cannot write there ({exc.strerror or exc}).") from None
    if not existed:
        out.unlink(missing_ok=True)


def _out_paths(out: Path, count: int) -> list[Path]:
    """The files a run writes: --out itself for one image, out_1.png .. out_N.png for several."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i + 1}.png") for i in range(count)]


def _same_file(a: Path, b: Path) -> bool:
    # Same file however it is spelled: `sub/../x.png`, a symlink or a hard link (samefile compares the
    # device and inode); resolved paths too, for a file system where samefile cannot tell.
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_not_an_input(args: argparse.Namespace, photos: list[str]) -> None:
    """--out (and its _1.._N forms) must not be one of the run's own photos: it would be overwritten."""
    inputs = [("--face", path) for path in getattr(args, "face_image", None) or []]
    inputs += [("--person", path) for person in getattr(args, "people", None) or [] for path in person]
    params = params_for(args.command)
    inputs += [(params[n].flag or "--" + n, getattr(args, n)) for n in photos if n != "face_image" and getattr(args, n)]
    # The run writes --out itself for one image (the server may allow fewer than asked), else the _N forms.
    for out in [args.out, *_out_paths(args.out, getattr(args, "num_images", 1) or 1)]:
        for flag, path in inputs:
            if _same_file(out, path):
                raise UserError(
                    f"--out {_shown(out)}: is the {flag} photo {_shown(path)}; writing there would overwrite it. "
                    "Name another file."
                )


def _flag(name: str, mode: str) -> str | None:
    """The command-line flag of a request parameter of `mode` (None: it has none)."""
    if name == "extra_face_images":
        return "--face"  # the photos after the first --face
    p = params_for(mode).get(name)
    if p is None or p.flag is None:
        return None
    return p.flag or "--" + name.replace("_", "-")


def _as_flag(exc: InvalidParameter, mode: str) -> UserError:
    """The API's "Invalid num_steps=1000: ..." as the flag the user typed: "--steps 1000: ..."."""
    base, bracket, key = exc.name.partition("[")
    flags = [_flag(part, mode) for part in base.split("/")]
    if None in flags:
        return exc
    if bracket:  # a strength inside --controlnet NAME=STRENGTH
        return UserError(f"{flags[0]} {key.rstrip(']')}={exc.value!r}: {exc.allowed}.")
    value = exc.value
    shown = " ".join(str(v) for v in value) if isinstance(value, tuple) else repr(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        shown = str(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return UserError(f"{'/'.join(f for f in flags if f)} {shown}: {exc.allowed}.")


def _generate(args: argparse.Namespace) -> int:
    """A mode's command (args.command): one request, its images written to --out."""
    mode = args.command
    params = params_for(mode)
    photos = [name for name, p in params.items() if p.kind == "image"]  # face_image is a list: --face repeats
    people = [[str(path) for path in person] for person in getattr(args, "people", None) or []]
    listed = [*getattr(args, "face_image", []), *[Path(path) for person in people for path in person]]
    # Every path is checked before a model loads: a bad --out must not cost a whole generation.
    for path in [*listed, *[getattr(args, n) for n in photos if n != "face_image" and getattr(args, n)]]:
        _check_input(path)
    _check_out(args.out)
    _check_not_an_input(args, photos)
    values = {name: getattr(args, name) for name in params if hasattr(args, name)}
    if MODE_SPECS[mode].people:
        if len(people) > MAX_PEOPLE:  # more than the API's slots: the request's own check says so
            Request(mode=mode, people=people, names=values.get("names") or "")
        values.update({f"person_{k + 1}": person for k, person in enumerate(people)})
    else:
        faces = [str(path) for path in values.pop("face_image")]
        values.update(face_image=faces[0], extra_face_images=faces[1:])
    if "controlnets" in values:
        values["controlnets"] = dict(values["controlnets"])
    for name in photos:
        if name != "face_image":
            values[name] = str(values[name]) if values[name] else None
    try:
        request = Request.from_api(values, mode)
    except InvalidParameter as exc:
        raise _as_flag(exc, mode) from None
    # Imported once the request holds: torch and diffusers take seconds to import, which a refusal of a typed
    # flag or a missing file never needs (it was said after them).
    from ..engine import get_engine

    try:
        result = get_engine().run(request)
    except InvalidParameter as exc:
        raise _as_flag(exc, mode) from None
    paths = []
    for image, path in zip(result.images, _out_paths(args.out, len(result.images)), strict=True):
        try:
            image.save(path)
        except OSError as exc:
            raise UserError(f"--out {_shown(path)}: the image could not be written ({exc.strerror or exc}).") from None
        paths.append(str(path))
    summary = {
        "images": paths,
        "seed": result.seed,
        # A group: per image, {name: score} per person.
        "similarities": result.person_similarities or result.similarities,
        # A group of two or more: per image, {name: {"margin", "nearest_other"}} (see the API's outputs).
        **({"identity_margins": result.person_margins} if result.person_margins else {}),
        "size": [result.width, result.height],
        "steps": result.num_steps,
        "guidance": result.guidance_scale,
        "faces_found": result.faces_found,
        "profile": result.profile,
        "timings_ms": result.timings_ms,
        "warnings": result.warnings,
        "refined": result.refined,
    }
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {', '.join(paths)} (seed {result.seed}, {result.width}x{result.height}, "
            f"{result.timings_ms.get('total_ms', 0) / 1000:.1f} s)"
        )
    return 0


def _preset_hint() -> str:
    """What a missing checkpoint's error adds when no preset was asked for: the way to try it offline."""
    if os.environ.get("INSTANTID_PRESET", "").strip():
        return ""
    return (
        " To try the command line without the real models, set INSTANTID_PRESET=tiny (tiny random models, written "
        "locally: every step runs, the images are noise)."
    )


def preload_yaml(files: dict[tuple[str, str], list[str]]) -> str:
    """The `preload_from_hub` block for the README's front matter (model repos; other kinds as comments)."""
    lines = ["preload_from_hub:"]
    for (repo_type, repo_id), names in files.items():
        entry = f"  - {repo_id} {','.join(names)}"
        # The Hub documents preload_from_hub for model repos; a Space's files still download at start-up.
        lines.append(entry if repo_type == "model" else f"  # ({repo_type}) {entry.strip()[2:]}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """A command's output is its result and our own warnings: not the libraries' advice, loading bars and
    progress bars (our own diffusion progress is off already). Set before they are imported: they read these
    once. INSTANTID_LOG_LEVEL=INFO (or DEBUG) leaves them as they are, for a look inside."""
    if os.environ.get("INSTANTID_LOG_LEVEL", "WARNING").upper() in ("INFO", "DEBUG"):
        return
    for name, value in {
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' bars ("Loading weights")
        "TQDM_DISABLE": "1",  # any other tqdm bar (diffusers' "Loading pipeline components", writing shards)
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
        "HF_HUB_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")  # the libraries' deprecation and advice warnings
    warnings.filterwarnings("default", module=r"instantid(\.|$)")  # ours, were there any, still show
    for name in ("transformers", "diffusers", "huggingface_hub", "insightface", "onnxruntime", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _face_line(index: int, face: dict) -> str:
    """One face of `faces` as one line: its number (swap's --face-index), size, box, score, keypoints."""
    x1, y1, x2, y2 = (round(v) for v in face["bbox"])
    points = " ".join(f"{name} {round(x)},{round(y)}" for name, (x, y) in zip(
        ("left-eye", "right-eye", "nose", "mouth-left", "mouth-right"), face["kps"], strict=False))
    return f"{index}: {x2 - x1}x{y2 - y1} px at {x1},{y1}-{x2},{y2}, score {face['score']:.2f}; {points}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, so that its --help is the one pointed to
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=os.environ.get("INSTANTID_LOG_LEVEL", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command in MODES:
            return _generate(args)
        if args.command == "faces":
            from ..engine import get_engine

            _check_input(args.path)
            faces = [f.to_json() for f in get_engine().analyze(str(args.path))]
            if args.json:
                print(json.dumps(faces))
            elif not faces:
                print("no face found")
            else:
                print(f"{len(faces)} face(s), largest first (the number is swap's --face-index):")
                for index, face in enumerate(faces):
                    print(_face_line(index, face))
            return 0
        if args.command == "status":
            from ..engine import get_engine

            print(
                "note: this is this command's own new process (nothing loaded yet); a running app reports its own on "
                'its Status tab or to gradio_client: client.predict(api_name="/status").',
                file=sys.stderr,
            )
            print(json.dumps(get_engine().report(), indent=1))
            return 0
        if args.command == "preload":
            from ..models.loading import loader_files
            from ..settings import get_settings

            print(preload_yaml(loader_files(get_settings())))
            return 0
        if args.command == "bench":
            from bench import run_benchmark  # the bench/ folder at the repository root

            return run_benchmark(args.name, quick=args.quick, record=args.record)
    except CheckpointError as exc:
        print(_one_line(f"error: {exc}{_preset_hint()}"), file=sys.stderr)
        return 2
    except UserError as exc:
        print(_one_line(f"error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1

