"""Loading: every checkpoint through the Hugging Face cache into its model, placed per the memory profile.

The engine decides when (at start-up, in the background, on first use) and keeps what was loaded; this
module knows how. Each loader reports where a component came from through `record(role, repo, path)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..settings import CONTROL_TYPES, Settings
from ..vision import faces as face_lib
from .hub import (
    RepoRef,
    choose_weights,
    component_files,
    face_model_files,
    fetch,
    fetch_component,
    ip_adapter_file,
    list_files,
    lora_file,
    resolve_face_models,
)
from .memory import Profile, apply_profile, torch_dtype

Record = Callable[[str, Any, Path], None]


def _ignore(role: str, repo: Any, path: Path) -> None:
    pass


def load_face_analyzer(s: Settings, record: Record = _ignore) -> face_lib.FaceAnalyzer:
    """The insightface detector and recognizer (onnxruntime, on the CPU unless the providers say otherwise)."""
    folder = resolve_face_models(s.face_models, cache_dir=s.hub_cache, offline=s.hub_offline)
    record("face models", s.face_models, folder)
    return face_lib.FaceAnalyzer(folder, providers=s.onnx_providers, det_size=s.face_det_size)


def load_extra_controlnet(s: Settings, name: str, profile: Profile, record: Record = _ignore) -> Any:
    """An extra ControlNet (pose, canny, depth), placed the way the profile places the IdentityNet."""
    from diffusers import ControlNetModel

    repo = RepoRef.parse(s.controlnets[name])
    files = list_files(repo, cache_dir=s.hub_cache, offline=s.hub_offline)
    folder, variant = fetch_component(repo, repo.subfolder, files=files, cache_dir=s.hub_cache, offline=s.hub_offline)
    net = _from_pretrained(ControlNetModel, folder, variant, torch_dtype(profile.dtype)).eval()
    record(f"{name} ControlNet", repo, folder)
    return place_like_profile(net, profile)


def load_estimator(s: Settings, name: str, device: str, record: Record = _ignore) -> Any:
    """The model that makes the `name` ControlNet's condition image from a photo (its `ControlCode.estimator`)."""
    from .controls import CONTROLS

    estimator = CONTROLS[name].estimator
    if estimator is None:
        raise ValueError(f"The {name} control type makes its condition without an estimator.")
    folders = []
    for field_name in CONTROL_TYPES[name].estimator_fields:
        repo = getattr(s, field_name)
        folders.append(_snapshot(repo, s))
        record(field_name.replace("_", " "), repo, folders[-1])
    return estimator.from_folders(*folders, device=device)


# Each speed's LoRA as the start-up, the status report and the checkpoint list name it.
LORA_LABELS = {"fast": "fast LoRA", "turbo": "turbo LoRA", "lcm": "LCM-LoRA"}


def load_speed_lora(loras: Any, s: Settings, name: str, record: Record = _ignore) -> None:
    """The LoRA of speed `name` (`requests.SPEEDS`: fast, turbo, lcm) into the engine's `LoraSwitch`, off."""
    from ..declaration import SPEEDS

    field_name = SPEEDS[name].lora
    assert field_name is not None, f"speed {name} runs on the base weights"
    repo = RepoRef.parse(getattr(s, field_name))
    files = list_files(repo, cache_dir=s.hub_cache, offline=s.hub_offline)
    file = lora_file(repo, files)
    path = fetch(repo, file, cache_dir=s.hub_cache, offline=s.hub_offline)
    loras.load(name, str(path.parent), path.name, source=f"{repo.repo_id}/{file}")
    record(LORA_LABELS[name], repo, path)


def resampler_dtype(profile: Profile) -> Any:
    """The resampler's dtype: the profile's on a GPU; on a CPU bfloat16 where it has native bf16 matmuls.

    On the CPU the resampler (1280 wide, 4 layers) is the largest per-request cost outside the denoising
    loop; with AVX512-BF16/AMX bf16 halves it (bench overhead). Its tokens are cast to the text
    embeddings' dtype before the UNet sees them.
    """
    import torch

    if profile.device != "cpu":
        return torch_dtype(profile.dtype)
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 else torch.float32


def _from_pretrained(cls: Any, folder: Path, variant: str | None, dtype: Any) -> Any:
    """from_pretrained of one local component folder with the weight format `hub` chose."""
    # Judged by the weight file names from_pretrained will look for: a cached snapshot can also hold
    # unrelated .safetensors files (e.g. a single-file checkpoint beside a diffusers .bin).
    chosen = choose_weights([p.name for p in folder.iterdir()], "")
    use_safetensors = bool(chosen) and ".safetensors" in chosen[0]
    return cls.from_pretrained(
        str(folder), variant=variant, use_safetensors=use_safetensors, dtype=dtype, low_cpu_mem_usage=True
    )


def place_like_profile(net: Any, profile: Profile) -> Any:
    """Place an extra ControlNet the way the profile placed the IdentityNet (it runs beside it every step)."""
    import torch

    if profile.device == "cpu":
        return net.to("cpu")
    if profile.offload == "group":
        net.enable_group_offload(
            onload_device=torch.device(profile.device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=True,
        )
        return net
    return net.to(profile.device)


def _snapshot(spec: str, s: Settings) -> Path:
    """A transformers model folder (config, processor config, one weight format) through the cache."""
    repo = RepoRef.parse(spec)
    files = list_files(repo, cache_dir=s.hub_cache, offline=s.hub_offline)
    folder, _ = fetch_component(repo, repo.subfolder, files=files, cache_dir=s.hub_cache, offline=s.hub_offline)
    return folder


def load_ip_adapter_file(
    path: Path, dtypes: tuple[Any, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image_proj, ip_adapter) state dicts from `ip-adapter.bin` (weights only) or a safetensors file.

    With `dtypes` (image_proj's, ip_adapter's) every tensor is read into that dtype one at a time, in
    memory of its own: nothing is left pointing into the file, and each float32 source's pages leave RAM
    as soon as its copy exists, so the float32 file is never held beside the cast weights.
    """
    import torch

    mapped = False
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        parts: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in parts:
                parts[head][rest] = value
        sd: Any = parts
    else:
        try:
            # weights_only: a pickle from the Hub must not be able to run code. mmap: no second copy in RAM.
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            mapped = True
        except RuntimeError:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path.name} could not be read safely ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(sd, dict) or "image_proj" not in sd or "ip_adapter" not in sd:
        raise CheckpointError(f"{path.name} is not an InstantID ip-adapter: expected 'image_proj' and 'ip_adapter'.")
    if dtypes is None:
        return sd["image_proj"], sd["ip_adapter"]
    image_proj, ip_adapter = sd.pop("image_proj"), sd.pop("ip_adapter")
    del sd
    return _read_owned(image_proj, dtypes[0], mapped), _read_owned(ip_adapter, dtypes[1], mapped)


def _read_owned(state: dict[str, Any], dtype: Any, mapped: bool) -> dict[str, Any]:
    """`state`'s tensors copied into `dtype` (floating point ones) in their own memory, emptying `state`.

    A module adopting a tensor that still points into the memory-mapped pickle would keep the whole
    mapping alive, and with it every page of the file already read (1.4 GB of float32 IP layers when the
    resampler stays float32, on CPUs without bf16).
    """
    out: dict[str, Any] = {}
    for key in list(state):
        src = state.pop(key)
        out[key] = src.to(dtype=dtype, copy=True) if src.is_floating_point() else src.clone()
        if mapped:
            _drop_file_pages(src)
        del src
    return out


def _drop_file_pages(tensor: Any) -> None:
    """Unmap the file pages under a tensor read through a memory map (`mmap=True`) (a private, never-written
    mapping: the kernel re-reads them from the file if touched again). Only whole pages inside the
    tensor's bytes, so a neighbour sharing a page keeps it. Best effort: Linux and macOS only."""
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    if not tensor.is_contiguous():
        return  # its bytes are not one range
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def checkpoint_entry(role: str, repo: Any, path: Path) -> dict[str, str]:
    """Role, repo, the revision served from the cache (its snapshot's commit) and the weight file(s) used."""
    path = Path(path)
    parts = path.parts
    revision = parts[parts.index("snapshots") + 1][:12] if "snapshots" in parts else "local folder"
    if path.is_dir():
        weights = ", ".join(Path(w).name for w in choose_weights([p.name for p in path.iterdir()], "")) or "-"
    else:
        weights = path.name
    return {"role": role, "repo": str(repo), "revision": revision, "weights": weights}


Say = Callable[[float, str], None]


def load_pipeline(s: Settings, profile: Profile, progress: Say | None = None, record: Record | None = None) -> Any:
    """Resolve and load every component, build the InstantID pipeline and place it per `profile`.

    `record(role, repo, path)` hears where each component came from (the status report lists them).
    """
    from .pipeline import InstantIDPipeline

    say = progress or (lambda fraction, message: None)
    note = record or _ignore
    parts = _load_base(s, profile, say, note)
    parts["controlnet"], parts["resampler"] = _load_instantid(s, profile, parts["unet"], say, note)
    pipe = InstantIDPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    say(0.9, f"placing models ({profile.name} profile)")
    apply_profile(pipe, profile)
    say(1.0, "ready")
    return pipe


def _load_base(s: Settings, profile: Profile, say: Say, note: Record) -> dict[str, Any]:
    """The SDXL base model's parts: UNet, VAE, both text encoders and tokenizers, the scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cache, offline = s.hub_cache, s.hub_offline
    dtype = torch_dtype(profile.dtype)
    base = RepoRef.parse(s.base_model)
    say(0.1, f"listing {base}")
    files = list_files(base, cache_dir=cache, offline=offline)
    if "model_index.json" not in files:
        raise CheckpointError(f"'{base}' is not a diffusers SDXL repo (no model_index.json): set INSTANTID_BASE_MODEL.")
    models = {
        "unet": (UNet2DConditionModel, dtype),
        "vae": (AutoencoderKL, torch_dtype(getattr(profile, "vae_dtype", profile.dtype))),
        "text_encoder": (CLIPTextModel, dtype),
        "text_encoder_2": (CLIPTextModelWithProjection, dtype),
    }
    loaded: dict[str, Any] = {}
    for i, (name, (cls, dt)) in enumerate(models.items()):
        say(0.15 + 0.12 * i, f"{base}: {name}")
        folder, variant = fetch_component(base, name, files=files, cache_dir=cache, offline=offline)
        loaded[name] = _from_pretrained(cls, folder, variant, dt).eval()
        note(f"base model: {name}", base, folder)
    for name in ("tokenizer", "tokenizer_2"):
        folder, _ = fetch_component(base, name, files=files, cache_dir=cache, offline=offline)
        loaded[name] = CLIPTokenizer.from_pretrained(str(folder))
    sched_folder, _ = fetch_component(base, "scheduler", files=files, cache_dir=cache, offline=offline)
    # Euler is the official Space's default; other schedulers are built from the same config per request.
    loaded["scheduler"] = EulerDiscreteScheduler.from_pretrained(str(sched_folder))
    return loaded


def _load_instantid(s: Settings, profile: Profile, unet: Any, say: Say, note: Record) -> tuple[Any, Any]:
    """The IdentityNet and the resampler; the ip-adapter's attention weights go into `unet`."""
    from diffusers import ControlNetModel

    from .attention import install_ip_processors
    from .resampler import build_resampler

    cache, offline = s.hub_cache, s.hub_offline
    repo = RepoRef.parse(s.instantid_repo)
    say(0.65, f"{repo}: IdentityNet")
    id_files = list_files(repo, cache_dir=cache, offline=offline)
    subfolder = "/".join(p for p in (repo.subfolder, "ControlNetModel") if p)
    cn_folder, cn_variant = fetch_component(repo, subfolder, files=id_files, cache_dir=cache, offline=offline)
    identitynet = _from_pretrained(ControlNetModel, cn_folder, cn_variant, torch_dtype(profile.dtype)).eval()
    note("IdentityNet", repo, cn_folder)

    say(0.8, f"{repo}: ip-adapter")
    ip_name = ip_adapter_file(repo, id_files)
    ip_path = fetch(repo, ip_name, cache_dir=cache, offline=offline)
    note("ip-adapter", repo, ip_path)
    # Read straight into the dtypes they run in: the file is float32, the cast copies are the only ones kept.
    image_proj, ip_weights = load_ip_adapter_file(ip_path, (resampler_dtype(profile), unet.dtype))
    source = f"{repo}/{ip_name}"
    resampler = build_resampler(image_proj, source=f"{source}[image_proj]", dtype=resampler_dtype(profile))
    if resampler.config.output_dim != unet.config.cross_attention_dim:
        raise CheckpointError(
            f"{source}: the resampler makes {resampler.config.output_dim}-wide face tokens but the base model's "
            f"UNet attends over {unet.config.cross_attention_dim}: the ip-adapter does not match the base model."
        )
    install_ip_processors(unet, ip_weights, resampler.config.num_queries, source=f"{source}[ip_adapter]")
    return identitynet, resampler


BASE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def loader_files(s: Settings) -> dict[tuple[str, str], list[str]]:
    """(repo type, repo id) -> the files the resident start-up fetches from it, chosen by the loaders' own rules
    from each repo's listing (the Hub's, or the cache's offline): what a Space should download at build time.
    """
    out: dict[tuple[str, str], list[str]] = {}

    def add(spec: str, pick: Callable[[RepoRef, list[str]], list[str]]) -> None:
        repo = RepoRef.parse(spec)
        files = list_files(repo, cache_dir=s.hub_cache, offline=s.hub_offline)
        key = (repo.repo_type, repo.repo_id)
        out[key] = sorted(set(out.get(key, [])) | set(pick(repo, files)))

    def component(folder: Callable[[RepoRef], str]) -> Callable[[RepoRef, list[str]], list[str]]:
        return lambda repo, files: component_files(files, folder(repo))

    add(s.base_model, lambda repo, files: [f for name in BASE_COMPONENTS for f in component_files(files, name)])
    add(s.instantid_repo, lambda repo, files: [
        *component_files(files, "/".join(p for p in (repo.subfolder, "ControlNetModel") if p)),
        ip_adapter_file(repo, files),
    ])
    from ..declaration import SPEEDS

    for speed in SPEEDS.values():
        if speed.lora is not None:
            add(getattr(s, speed.lora), lambda repo, files: [lora_file(repo, files)])
    estimators = [getattr(s, f) for c in CONTROL_TYPES.values() for f in c.estimator_fields]
    for spec in [*s.controlnets.values(), *estimators]:
        add(spec, component(lambda repo: repo.subfolder))
    if not Path(s.face_models).expanduser().is_dir():
        add(s.face_models, face_model_files)
    return out
