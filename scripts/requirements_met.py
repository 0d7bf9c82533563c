"""Exit 0 when every requirement given is already installed at a version it accepts, else 1 (naming the first miss).

`scripts/run.sh` asks this before `pip install`: pip takes about 11 s to find that nothing is to be done, which was
half of a 21 s restart. Reading the installed packages' metadata takes a fraction of a second. Arguments are
requirement files (`-r` lines inside are followed) and single requirements (`torch==2.13.0`); extras are checked
one level down (`gradio[mcp]` needs `mcp` at the version gradio's metadata asks). Anything this cannot read
(a URL, an option line, no `packaging` yet on a fresh machine) counts as not met, so pip decides.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path


def _lines(arg: str, seen: set[Path]) -> list[str]:
    path = Path(arg)
    if not path.exists() or path.is_dir():  # a requirement, or a file (a pipe from `<(...)` too)
        return [arg]
    if path.resolve() in seen:  # a file that -r's itself
        return []
    seen.add(path.resolve())
    out: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            out += _lines(str(path.parent / line[3:].strip()), seen)
        else:
            out.append(line)
    return out


def unmet(requirements: list[str]) -> str | None:
    """The first requirement not met as installed, with why; None when all are."""
    from packaging.requirements import InvalidRequirement, Requirement

    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            return f"{text}: not a requirement this check reads"
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return f"{req.name} is not installed"
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return f"{req.name} {version} is installed; {text} is asked"
        for extra in sorted(req.extras):
            for sub in metadata.requires(req.name) or []:
                sub_req = Requirement(sub)
                if sub_req.marker is not None and sub_req.marker.evaluate({"extra": extra}) and (
                    miss := unmet([str(sub_req).split(";", 1)[0].strip()])
                ):
                    return f"{miss} (for {req.name}[{extra}])"
    return None


def main(argv: list[str]) -> int:
    try:
        miss = unmet([line for arg in argv for line in _lines(arg, set())])
    except Exception as exc:  # whatever it is, pip sorts it out
        miss = f"could not check ({type(exc).__name__}: {exc})"
    if miss:
        print(f"requirements not met: {miss}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
