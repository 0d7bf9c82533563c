"""The README as a newcomer meets it: every Python and shell block runs as written, its settings table is whole.

The blocks run against the session's tiny-preset app (`tiny_app`): `ORG/SPACE`, the one placeholder the README
tells readers to replace, becomes that app's URL, and nothing else in a block changes. They run from the
repository root (the photos are `assets/`'s), shell blocks with bash, the command line on the tiny preset
(`tiny_env`, as tests/test_cli.py runs it). A block that cannot run here (it installs, serves forever, or
needs the Hub) says so in its first line, `# not run by tests: <reason>`; every other block must run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLACEHOLDER = "ORG/SPACE"
SKIP_MARK = "# not run by tests:"
OUTPUTS = ROOT / "outputs"  # where the README's examples write (git-ignored)
# A fenced block: its language and its text (```lang ... ```).
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", re.M | re.S)
CODE_LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "bash"}


@dataclass(frozen=True)
class Block:
    language: str  # "python" or "bash"
    code: str
    line: int  # the fence's line in README.md

    @property
    def skip_reason(self) -> str | None:
        first = self.code.lstrip("\n").splitlines()[0] if self.code.strip() else ""
        return first[len(SKIP_MARK):].strip() if first.startswith(SKIP_MARK) else None

    def where(self) -> str:
        return f"README.md line {self.line} ({self.language})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, in order; an unlabelled or unknown fence counts as code too, so none hides."""
    return [
        Block(CODE_LANGUAGES.get(m.group(1), m.group(1) or "unlabelled"), m.group(2),
              text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def front_matter_end(text: str) -> int:
    """The line number of the front matter's closing `---`."""
    lines = text.splitlines()
    assert lines[0] == "---", "README.md must start with the Space's front matter"
    return lines.index("---", 1) + 1


def test_readme_blocks_run_or_say_why() -> None:
    """Each block is Python or bash; the skipped ones give a reason; the API and command-line examples are not
    skipped; the two set-up commands sit within 40 lines of the front matter; the README stays short."""
    text = README.read_text()
    blocks = readme_blocks(text)
    assert blocks, "README.md has no code blocks"
    for b in blocks:
        assert b.language in ("python", "bash"), f"{b.where()}: label it python or bash"
        if b.skip_reason is not None:
            assert b.skip_reason, f"{b.where()}: say why it is not run after {SKIP_MARK!r}"
    run = [b for b in blocks if b.skip_reason is None]
    assert any(b.language == "python" and f'Client("{PLACEHOLDER}")' in b.code for b in run), (
        "the gradio_client example must run (with the ORG/SPACE placeholder)"
    )
    assert any(b.language == "bash" and "python -m instantid " in b.code for b in run), (
        "the command-line example must run"
    )
    # A Space id or URL other than the placeholder could not be replaced by the test's app.
    for b in run:
        for target in re.findall(r"Client\(\s*[\"']([^\"']+)[\"']", b.code):
            assert target == PLACEHOLDER, f"{b.where()}: Client({target!r}): use {PLACEHOLDER!r}"

    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it within 250 (move the rest to docs/)"
    top = "\n".join(lines[front_matter_end(text):front_matter_end(text) + 40])
    for command in ("bash scripts/run.sh", "bash scripts/test.sh"):
        assert re.search(rf"^{re.escape(command)}$", top, re.M), f"{command!r} within 40 lines of the front matter"


def test_readme_links_resolve() -> None:
    """Every relative link in the README and docs/ names a file that exists."""
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_no_issue_numbers_in_user_docs() -> None:
    """User-facing docs speak of the product, not of its tracker: no "#17", no "issue 23"."""
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = FENCE.sub("", page.read_text())  # code (e.g. a colour "#1" caption) is not prose
        # "#1, seed 42" is a caption the app writes, quoted.
        found = re.findall(r"(?<![\w&])#\d+\b(?!, seed)|\bissues? \d+", text, re.I)
        assert not found, f"{page.relative_to(ROOT)} mentions {found}"


class _Recording(Mapping[str, str]):
    """An empty environment that remembers every name read from it."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_settings_table_lists_every_variable() -> None:
    """Every variable the settings read (and the command line's INSTANTID_LOG_LEVEL) is in the README's table."""
    from instantid.settings import Settings

    env = _Recording()
    Settings.from_env(env)
    names = set(env.read)
    for path in (ROOT / "instantid").rglob("*.py"):  # every folder: the command line is frontends/cli.py
        names |= set(re.findall(r"environ\.get\(\"(INSTANTID_[A-Z0-9_]+)\"", path.read_text()))
    assert {"INSTANTID_PRESET", "INSTANTID_CONTROLNET_DEPTH", "INSTANTID_LOG_LEVEL"} <= names  # the reading works
    table = README.read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"README's Settings table lacks {missing}"


# --- running the blocks ---------------------------------------------------------------------------------------


def _untracked() -> set[str] | None:
    """Files git would list as new (ignored ones left out); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return {line[3:] for line in out.stdout.splitlines() if line.startswith("??")}


def _out_paths(code: str) -> list[Path]:
    """The files a shell block's `--out PATH` arguments name (with --num-images N: PATH_1 .. PATH_N)."""
    paths = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "--out" not in words:
            continue
        out = ROOT / words[words.index("--out") + 1]
        n = int(words[words.index("--num-images") + 1]) if "--num-images" in words else 1
        paths += [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, n + 1)]
    return paths


def _run(block: Block, url: str, env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    code = block.code.replace(PLACEHOLDER, url)
    if block.language == "python":
        script = tmp / f"readme_{block.line}.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_readme_runs_as_written(tiny_app: Any, tiny_env: dict[str, str], tmp_path: Path) -> None:
    """Every block not marked as skipped runs to exit status 0 against the tiny-preset app; the command line's
    `--out` files are written, under `outputs/`, which git ignores (nothing new for `git status`)."""
    blocks = [b for b in readme_blocks(README.read_text()) if b.skip_reason is None]
    # `python` in a shell block is this interpreter, as in the environment the suite was installed into.
    env = {**tiny_env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), tiny_env.get("PATH", "")])}
    untracked_before = _untracked()
    existed = set(OUTPUTS.rglob("*")) if OUTPUTS.exists() else None
    expected = [p for b in blocks if b.language == "bash" for p in _out_paths(b.code)]
    assert expected, "the command-line example writes no --out file"
    try:
        # The Python blocks talk to the app server, the shell blocks start their own processes: side by side
        # they keep both cores busy. Within each kind, the README's order.
        def run_kind(language: str) -> list[tuple[Block, subprocess.CompletedProcess[str]]]:
            return [(b, _run(b, tiny_app.url, env, tmp_path)) for b in blocks if b.language == language]

        with ThreadPoolExecutor(2) as pool:
            done = [r for f in [pool.submit(run_kind, k) for k in ("python", "bash")] for r in f.result()]
        for block, proc in done:
            assert proc.returncode == 0, (
                f"{block.where()} failed with status {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        for path in expected:
            assert path.is_file() and path.stat().st_size > 0, f"{path.relative_to(ROOT)} was not written"
            assert OUTPUTS in path.parents, f"{path.relative_to(ROOT)}: examples write under outputs/"
        assert list(OUTPUTS.glob("api_knight_*")) and list(OUTPUTS.glob("api_group.*")), "the Python example saves"
        if untracked_before is not None:
            new = (_untracked() or set()) - untracked_before
            assert not new, f"the README's examples left files git lists as new: {sorted(new)}"
    finally:
        # Leave outputs/ as it was: remove only what this run added.
        if OUTPUTS.exists():
            for path in sorted(OUTPUTS.rglob("*"), reverse=True):
                if existed is None or path not in existed:
                    path.unlink() if path.is_file() else path.rmdir()
            if existed is None:
                OUTPUTS.rmdir()
