"""Lazy checkpoint resolution through the Hugging Face cache.

Only the files a component needs are fetched (config, tokenizer files, and ONE weight format:
fp16 safetensors where the repo has them, else full safetensors, else `.bin` as a last resort), on
first use, into the standard cache (never `local_dir` copies: those do not read the cache offline).
Errors name the repo and file and say what to do.

`publish_folder` writes a hand-built cache entry (refs/main + snapshots/<commit>/...), which is how the
tiny preset, the tests and the benchmarks serve local checkpoints through the real loading path.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model", "pytorch_lora_weights")


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    repo_type: str = "model"
    subfolder: str = ""

    @classmethod
    def parse(cls, spec: str) -> RepoRef:
        """`org/name`, `space:org/name`, or either followed by `/sub/folder`."""
        repo_type = "model"
        for prefix in ("space:", "model:", "dataset:"):
            if spec.startswith(prefix):
                repo_type, spec = prefix[:-1], spec[len(prefix) :]
        parts = [p for p in spec.strip("/").split("/") if p]
        if len(parts) < 2:
            raise CheckpointError(f"'{spec}' is not a Hub repo id: use org/name (optionally /subfolder).")
        return cls("/".join(parts[:2]), repo_type, "/".join(parts[2:]))

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}:"
        return f"{kind}{self.repo_id}" + (f"/{self.subfolder}" if self.subfolder else "")


# huggingface_hub retries a failed connection five times (about 25 s) on every call; one quick probe says
# whether to call it at all. Remembered for a minute, so an outage at start-up does not outlive itself.
PROBE_TIMEOUT_S = 5.0
PROBE_MEMORY_S = 60.0
_probe: tuple[float, str] = (-math.inf, "")  # (when, why unreachable: "" = reachable)


def hub_unreachable() -> str:
    """Why the Hub cannot be reached ("" when it can): one request, no retries, through huggingface_hub's
    own HTTP session (so its proxy and endpoint settings apply)."""
    global _probe
    if time.monotonic() - _probe[0] > PROBE_MEMORY_S:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
            why = ""
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        _probe = (time.monotonic(), why)
    return _probe[1]


def _hub_error(repo: str, filename: str | None, exc: Exception, offline: bool) -> CheckpointError:
    from huggingface_hub import errors as hf_errors

    what = f"'{filename}' from '{repo}'" if filename else f"'{repo}'"
    if isinstance(exc, hf_errors.GatedRepoError):
        hint = "the repo is gated: accept its licence on the Hub and set HF_TOKEN."
    elif isinstance(exc, hf_errors.RepositoryNotFoundError):
        hint = "no such repo (or it is private): check the repo id in the settings, or set HF_TOKEN."
    elif isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)) or offline:
        hint = (
            "it is not in the local Hugging Face cache and the Hub cannot be reached"
            + (" (HF_HUB_OFFLINE=1)" if offline else f" ({hub_unreachable() or 'no answer'})")
            + ": connect to the network once, or place the files in the cache (HF_HUB_CACHE)."
        )
    elif isinstance(exc, (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError)):
        hint = "the repo has no such file: check that the repo id points to the right kind of checkpoint."
    else:
        hint = (
            f"the Hub cannot be reached ({type(exc).__name__}: {exc}) and it is not in the local cache: check "
            "the network, or set HF_HUB_OFFLINE=1 to use only the local cache (HF_HUB_CACHE)."
        )
    return CheckpointError(f"Could not get {what}: {hint}")


def _snapshot_dir(repo: RepoRef, cache_dir: Path | None, offline: bool) -> Path | None:
    """The cached snapshot folder for the repo's main ref, if the cache has one."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo.repo_id,
                repo_type=repo.repo_type,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=["__nothing__"],
            )
        )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, FileNotFoundError):
        return None
    except Exception as exc:  # a corrupt cache entry must not look like "not cached"
        if offline:
            raise _hub_error(str(repo), None, exc, offline) from exc
        return None


def list_files(repo: RepoRef, *, cache_dir: Path | None, offline: bool) -> list[str]:
    """Repo-relative paths of the files in the repo (from the Hub, or from the cache when offline)."""
    if not offline:
        from huggingface_hub import HfApi

        try:
            if hub_unreachable():
                raise ConnectionError(hub_unreachable())
            return list(HfApi().list_repo_files(repo.repo_id, repo_type=repo.repo_type))
        except Exception as exc:
            # Network trouble: fall back to what the cache holds, and only fail if that is nothing.
            snap = _snapshot_dir(repo, cache_dir, offline)
            if snap is None:
                raise _hub_error(str(repo), None, exc, offline) from exc
    else:
        snap = _snapshot_dir(repo, cache_dir, offline)
        if snap is None:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise _hub_error(str(repo), None, LocalEntryNotFoundError("not cached"), offline)
    return sorted(
        str(p.relative_to(snap)).replace(os.sep, "/") for p in snap.rglob("*") if p.is_file() or p.is_symlink()
    )


def fetch(repo: RepoRef, filename: str, *, cache_dir: Path | None, offline: bool) -> Path:
    """One file through the cache; `filename` is relative to the repo root."""
    from huggingface_hub import hf_hub_download

    try:
        # Unreachable: straight to the cache, without the Hub's retries.
        local = offline or bool(hub_unreachable())
        return Path(
            hf_hub_download(
                repo.repo_id, filename, repo_type=repo.repo_type, cache_dir=cache_dir, local_files_only=local
            )
        )
    except Exception as exc:
        raise _hub_error(str(repo), filename, exc, offline) from exc


def choose_weights(files: Iterable[str], folder: str) -> list[str]:
    """Pick one weight format for the component in `folder` (repo-relative, '' for the root).

    fp16 safetensors if present, else plain safetensors, else `.bin`; sharded checkpoints bring their
    index. Never two formats: a second copy would double the download and the disk use.
    """
    here = [f for f in files if posixpath.dirname(f) == folder.strip("/")]
    names = [posixpath.basename(f) for f in here]

    def pick(pred: Callable[[str], bool]) -> list[str]:
        return [f for f, n in zip(here, names, strict=True) if pred(n)]

    def is_weight(n: str, ext: str) -> bool:
        # Sharded sets carry an index: model.safetensors.index.json (or .index.fp16.json for the variant).
        index = ext + ".index" in n and n.endswith(".json")
        return any(n.startswith(w) for w in WEIGHT_NAMES) and (n.endswith(ext) or index)

    def is_fp16(n: str) -> bool:
        return ".fp16." in n or ".fp16-" in n

    for ext, fp16 in ((".safetensors", True), (".safetensors", False), (".bin", True), (".bin", False)):
        chosen = pick(lambda n, ext=ext, fp16=fp16: is_weight(n, ext) and is_fp16(n) == fp16)
        if chosen:
            return chosen
    return []


def component_files(files: list[str], folder: str) -> list[str]:
    """What `fetch_component` takes from `folder`: its configs and tokenizer files, and one weight set."""
    prefix = folder.strip("/")
    in_folder = [f for f in files if posixpath.dirname(f) == prefix]
    small = [f for f in in_folder if f.endswith((".json", ".txt", ".model")) and "index.json" not in f]
    return sorted(set(small) | set(choose_weights(files, prefix)))


def lora_file(repo: RepoRef, files: list[str]) -> str:
    """The LoRA weights a reference names (`org/name/file.safetensors`, for repos that hold several), or the
    one at a repo's root: diffusers' own file name when present."""
    if repo.subfolder.endswith(".safetensors"):
        if repo.subfolder not in files:
            raise CheckpointError(f"'{repo.repo_id}' holds no file '{repo.subfolder}'.")
        return repo.subfolder
    names = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    if not names:
        raise CheckpointError(f"'{repo}' holds no LoRA .safetensors file at its root.")
    return "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in names else names[0]


def ip_adapter_file(repo: RepoRef, files: list[str]) -> str:
    """InstantID's ip-adapter (image projection + IP attention weights): safetensors before the pickle."""
    prefix = f"{repo.subfolder}/" if repo.subfolder else ""
    for name in ("ip-adapter.safetensors", "ip-adapter.bin"):
        if f"{prefix}{name}" in files:
            return f"{prefix}{name}"
    raise CheckpointError(f"'{repo}' has no ip-adapter.bin: set INSTANTID_REPO to an InstantID checkpoint repo.")


def face_model_files(repo: RepoRef, files: list[str]) -> list[str]:
    """The insightface detector(s) and recognizer(s) in a repo folder, by the same naming rule as the
    folder search in `faces`; the other antelopev2 models (landmarks, gender/age) are never fetched."""
    from ..vision.face_models import role_by_name

    onnx = [f for f in files if f.endswith(".onnx") and posixpath.dirname(f) == repo.subfolder]
    roles = {f: role_by_name(posixpath.basename(f)) for f in onnx}
    wanted = [f for f in onnx if roles[f] == "detection"] + [f for f in onnx if roles[f] == "recognition"]
    if not {"detection", "recognition"} <= set(roles.values()):
        raise CheckpointError(
            f"'{repo}' does not hold an insightface detector and recognizer ONNX pair "
            f"(found {[posixpath.basename(f) for f in onnx] or 'no ONNX files'})."
        )
    return wanted


def fetch_component(
    repo: RepoRef,
    folder: str,
    *,
    files: list[str],
    cache_dir: Path | None,
    offline: bool,
) -> tuple[Path, str | None]:
    """Fetch a diffusers/transformers component folder: configs, tokenizer files and one weight set.

    Returns (local folder, variant) where variant is "fp16" when fp16 weights were chosen.
    """
    prefix = folder.strip("/")
    needed = component_files(files, prefix)
    weights = choose_weights(files, prefix)
    if not needed:
        raise CheckpointError(f"'{repo}' has no component folder '{prefix or '.'}': check the repo id.")
    local: Path | None = None
    for f in needed:
        path = fetch(repo, f, cache_dir=cache_dir, offline=offline)
        local = path.parent
    if local is None:
        raise CheckpointError(f"'{repo}' folder '{prefix or '.'}' holds no files we can load.")
    variant = "fp16" if any(".fp16" in posixpath.basename(w) for w in weights) else None
    return local, variant


def resolve_face_models(spec: str, *, cache_dir: Path | None, offline: bool) -> Path:
    """A folder holding the face detector and recognizer: a local folder as is, or fetched from a repo.

    From a repo only the SCRFD detector and the ArcFace recognizer are fetched (the other antelopev2
    models are never used here).
    """
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if spec.startswith(("/", ".", "~")):
        raise CheckpointError(
            f"INSTANTID_FACE_MODELS={spec!r} is not a folder: point it to a folder with a detector and a "
            "recognizer ONNX file, or to a Hub repo id."
        )
    repo = RepoRef.parse(spec)
    files = list_files(repo, cache_dir=cache_dir, offline=offline)
    folder: Path | None = None
    for f in face_model_files(repo, files):
        folder = fetch(repo, f, cache_dir=cache_dir, offline=offline).parent
    assert folder is not None
    return folder


# --- hand-built cache entries --------------------------------------------------------------------


def publish_folder(
    cache_dir: Path, repo_id: str, source: Path, *, repo_type: str = "model", move: bool = False
) -> Path:
    """Serve `source` as `repo_id`'s main revision from `cache_dir`; returns the snapshot folder.

    The commit hash is derived from the file names and sizes so republishing the same files is stable.
    """
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode())
    for p in files:
        digest.update(f"{p.relative_to(source)}:{p.stat().st_size}".encode())
    commit = digest.hexdigest()
    root = _repo_root(cache_dir, repo_id, repo_type)
    snapshot = root / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if move:
        shutil.move(str(source), snapshot)
    else:
        shutil.copytree(source, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def _repo_root(cache_dir: Path, repo_id: str, repo_type: str = "model") -> Path:
    return cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cached_snapshot(cache_dir: Path, repo_id: str, *, repo_type: str = "model") -> Path | None:
    """The snapshot folder a cache's main ref points to (the cache's own layout, read without the Hub
    client), or None when the cache has no main ref for the repo."""
    root = _repo_root(cache_dir, repo_id, repo_type)
    ref = root / "refs" / "main"
    return root / "snapshots" / ref.read_text().strip() if ref.is_file() else None


def is_published(cache_dir: Path, repo_id: str, *, repo_type: str = "model", marker: str = "") -> bool:
    snap = cached_snapshot(cache_dir, repo_id, repo_type=repo_type)
    return snap is not None and snap.is_dir() and (not marker or (snap / marker).exists())

