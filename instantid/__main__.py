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
from pathlib import Path

from .errors import UserError
from .requests import DEFAULT_CONTROLNET_STRENGTH, MAX_PEOPLE, MODES, GenerateRequest, params_for


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line on stderr and exit status 2, like the rest."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see python -m instantid {self.prog.split()[-1]} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m instantid", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    helps = {
        "generate": "generate images of the person in --face",
        "restyle": "redraw --source under the prompt and style with the identity of --face",
        "swap": "replace a face of --target (--face-index, 0 = the largest) by the person in --face",
        "group": "a group portrait of two to four people (--person, once per person), each keeping their identity",
    }
    for mode in MODES:
        g = sub.add_parser(mode, help=helps[mode])
        _add_request_flags(g, mode)
        g.add_argument("--out", required=True, type=Path, help="output PNG; with --num-images N, _1.._N are added")
        g.add_argument("--json", action="store_true", help="print the result summary as JSON")

    f = sub.add_parser("faces", help="list the faces found in a photo as JSON, largest first")
    f.add_argument("path", type=Path)

    sub.add_parser("status", help="print the memory report as JSON")
    sub.add_parser(
        "preload",
        help="print the Space front matter's preload_from_hub: the files the start-up loads, from each repo's listing",
    )

    b = sub.add_parser("bench", help="run a benchmark; the last output line is one JSON object")
    b.add_argument("name", choices=("load-memory", "overhead", "gpu"))
    b.add_argument("--quick", action="store_true", help="reduced sizes / fewer requests")
    b.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    return p


def _add_request_flags(g: argparse.ArgumentParser, mode: str) -> None:
    """One flag per parameter of `mode`, made from its declaration (`instantid.requests.params_for`)."""
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


def _check_input(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file.")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; name a photo file.")
    if not path.is_file():
        raise UserError(f"{path}: is not a regular file (a device or a pipe); name a photo file.")


def _check_out(out: Path) -> None:
    """--out must name a .png file we can create, in a folder that exists; tried for real, then removed."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name a .png file in it, e.g. {out / 'out.png'}.")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: use a .png file name.")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist.")
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc}).") from None
    if not existed:
        out.unlink(missing_ok=True)


def _generate(args: argparse.Namespace) -> int:
    """`generate`, `restyle` or `swap` (args.command): one request, its images written to --out."""
    from .engine import get_engine

    mode = args.command
    params = params_for(mode)
    photos = [name for name, p in params.items() if p.kind == "image"]  # face_image is a list: --face repeats
    people = [[str(path) for path in person] for person in getattr(args, "people", None) or []]
    listed = [*getattr(args, "face_image", []), *[Path(path) for person in people for path in person]]
    # Every path is checked before a model loads: a bad --out must not cost a whole generation.
    for path in [*listed, *[getattr(args, n) for n in photos if n != "face_image" and getattr(args, n)]]:
        _check_input(path)
    _check_out(args.out)
    values = {name: getattr(args, name) for name in params if hasattr(args, name)}
    if mode == "group":
        if len(people) > MAX_PEOPLE:  # more than the API's slots: the request's own check says so
            GenerateRequest(mode=mode, people=people, names=values.get("names") or "")
        values.update({f"person_{k + 1}": person for k, person in enumerate(people)})
    else:
        faces = [str(path) for path in values.pop("face_image")]
        values.update(face_image=faces[0], extra_face_images=faces[1:])
    if "controlnets" in values:
        values["controlnets"] = dict(values["controlnets"])
    for name in photos:
        if name != "face_image":
            values[name] = str(values[name]) if values[name] else None
    request = GenerateRequest.from_api(values, mode)
    result = get_engine().generate(request)
    paths = []
    for i, image in enumerate(result.images):
        path = args.out if len(result.images) == 1 else args.out.with_name(f"{args.out.stem}_{i + 1}.png")
        try:
            image.save(path)
        except OSError as exc:
            raise UserError(f"--out {path}: the image could not be written ({exc.strerror or exc}).") from None
        paths.append(str(path))
    summary = {
        "images": paths,
        "seed": result.seed,
        # A group: per image, {name: score} per person.
        "similarities": result.person_similarities or result.similarities,
        "size": [result.width, result.height],
        "steps": result.num_steps,
        "guidance": result.guidance_scale,
        "faces_found": result.faces_found,
        "profile": result.profile,
        "timings_ms": result.timings_ms,
        "warnings": result.warnings,
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


def preload_yaml(files: dict[tuple[str, str], list[str]]) -> str:
    """The `preload_from_hub` block for the README's front matter (model repos; other kinds as comments)."""
    lines = ["preload_from_hub:"]
    for (repo_type, repo_id), names in files.items():
        entry = f"  - {repo_id} {','.join(names)}"
        # The Hub documents preload_from_hub for model repos; a Space's files still download at start-up.
        lines.append(entry if repo_type == "model" else f"  # ({repo_type}) {entry.strip()[2:]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("INSTANTID_LOG_LEVEL", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command in MODES:
            return _generate(args)
        if args.command == "faces":
            from .engine import get_engine

            if not args.path.is_file():
                raise UserError(f"{args.path}: no such file.")
            faces = get_engine().analyze(str(args.path))
            print(json.dumps([f.to_json() for f in faces], indent=1))
            return 0
        if args.command == "status":
            from .engine import get_engine

            print(json.dumps(get_engine().report(), indent=1))
            return 0
        if args.command == "preload":
            from .loading import loader_files
            from .settings import get_settings

            print(preload_yaml(loader_files(get_settings())))
            return 0
        if args.command == "bench":
            from bench import run_benchmark  # the bench/ folder at the repository root

            return run_benchmark(args.name, quick=args.quick, record=args.record)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
