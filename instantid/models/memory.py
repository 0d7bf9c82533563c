"""Hardware probe, named memory profiles chosen automatically, and the placement a profile asks for.

The profile decides where the models live (resident on the GPU, offloaded per model, streamed per
layer, or on the CPU) so a duplicated Space fits whatever hardware it lands on without anyone editing
code (memory_report.py measures what was placed). torch is imported inside the functions that need it: the
profile table and `choose_profile` stay importable by the UI without paying torch's start-up cost.

ZeroGPU rules this module respects: outside a `@spaces.GPU` call CUDA is emulated by the `spaces`
package, and initialising real CUDA in the main process breaks the later fork. So on ZeroGPU we only
call torch.cuda functions that `spaces` patches (and only once `spaces` is imported), and we read real
memory figures only when CUDA is already initialised (which happens inside a GPU call).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..settings import MEMORY_PROFILES

GIB = 1024**3

# "20 GB" cards report about 19.5 GiB and "12 GB" cards about 11.7 GiB, so the cut-offs sit just below
# the marketing sizes. Everything resident needs about 10 GiB of fp16 weights plus activations.
LARGE_MIN_BYTES = 19 * GIB
MEDIUM_MIN_BYTES = 11 * GIB

# When the Space runtime emulates CUDA and `spaces` has not patched torch yet we cannot ask the GPU. ZeroGPU's
# default size is half an RTX Pro 6000 Blackwell, 48 GB (hub-docs, 2026-08); assume the smallest slice it has
# ever handed out (an A100 MIG 3g.40gb) all the same: nothing is lost by planning for less.
ZEROGPU_NOMINAL_BYTES = 40 * GIB
ZEROGPU_NOMINAL_NAME = "ZeroGPU slice (half an RTX Pro 6000 Blackwell by default)"

# The same spellings the `spaces` package accepts: if we disagreed, we could believe CUDA is emulated
# while `spaces` has not patched it (or the other way round).
_TRUTHY = ("1", "t", "true")


def is_zerogpu(env: Mapping[str, str] | None = None) -> bool:
    # Set by the Space runtime, not a user knob, which is why settings.py does not own it.
    env = os.environ if env is None else env
    return env.get("SPACES_ZERO_GPU", "").strip().lower() in _TRUTHY


# --------------------------------------------------------------------------------------------------
# Hardware probe


@dataclass(frozen=True)
class Hardware:
    """What the machine offers; `probe_hardware()` fills it, tests construct it by hand."""

    cuda: bool
    gpu_name: str | None
    gpu_total_bytes: int
    bf16: bool
    zerogpu: bool
    host_total_bytes: int
    host_available_bytes: int
    cpu_count: int
    notes: tuple[str, ...] = ()


def probe_hardware(env: Mapping[str, str] | None = None) -> Hardware:
    """Probe GPU 0, host RAM and CPUs. Never raises: a broken driver reads as "no CUDA" with a note."""
    ram_total, ram_available, limited = host_ram()
    notes: list[str] = [f"container memory limit {ram_total / GIB:.1f} GiB (cgroup)"] if limited else []
    host = {"host_total_bytes": ram_total, "host_available_bytes": ram_available, "cpu_count": _cpu_count()}

    if is_zerogpu(env):
        name, total = ZEROGPU_NOMINAL_NAME, ZEROGPU_NOMINAL_BYTES
        # Once `spaces` is imported it has replaced these torch.cuda functions with fakes that describe
        # the slice; before that, the real ones would initialise CUDA in the main process, so skip them.
        if "spaces" in sys.modules:
            try:
                import torch

                props = torch.cuda.get_device_properties(0)
                name, total = str(props.name), int(props.total_memory)
            except Exception as exc:  # the emulation is not ours; failing keeps nominal values
                notes.append(f"could not read the emulated GPU properties ({type(exc).__name__})")
        notes.append(
            "ZeroGPU: CUDA is emulated outside GPU calls; the GPU (by default half an RTX Pro 6000 Blackwell) is "
            "lent per generation"
        )
        return Hardware(
            cuda=True, gpu_name=name, gpu_total_bytes=total, bf16=True, zerogpu=True, notes=tuple(notes), **host
        )

    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            if torch.cuda.device_count() > 1:
                notes.append(f"{torch.cuda.device_count()} GPUs found; only GPU 0 is used")
            return Hardware(
                cuda=True,
                gpu_name=str(props.name),
                gpu_total_bytes=int(props.total_memory),
                # Ampere (8.x) and newer do bf16 natively; torch can emulate it on a T4 but slowly.
                bf16=int(props.major) >= 8,
                zerogpu=False,
                notes=tuple(notes),
                **host,
            )
    except Exception as exc:  # a broken driver must not stop the app from starting on CPU
        notes.append(f"CUDA probe failed, using the CPU: {type(exc).__name__}: {exc}")
    return Hardware(cuda=False, gpu_name=None, gpu_total_bytes=0, bf16=False, zerogpu=False, notes=tuple(notes), **host)


def host_ram() -> tuple[int, int, bool]:
    """Host RAM total and available in bytes as this process may use it, and whether a container limit
    (its cgroup) set them: a Space is a container, and psutil reports the host machine's RAM."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit, used = container_memory()
    if limit is None or limit >= total:
        return total, available, False
    return limit, min(available, max(0, limit - (used or 0))), True


# cgroup v1 writes "no limit" as a page-rounded 2**63; anything this large is no limit.
_NO_LIMIT = 2**60


def container_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """This container's memory limit and current use in bytes from its cgroup (v2, else v1); None where there
    is no limit or no cgroup to read."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                                      "memory/memory.usage_in_bytes")):
        try:
            raw = (root / limit_file).read_text().strip()
        except OSError:
            continue
        if not raw.isdigit() or int(raw) >= _NO_LIMIT:  # v2 writes "max"
            return None, None
        try:
            used: int | None = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            used = None
        return int(raw), used
    return None, None


def _cpu_count() -> int:
    # Containers limit CPUs through affinity; os.cpu_count() reports the host's.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class Profile:
    """Where the models live and the defaults that fit there. Memory figures are estimates."""

    name: str
    description: str
    expected_vram: str
    expected_host_ram: str
    # Peak host RAM this profile needs (estimate); below it `choose_profile` adds a warning to the reason.
    host_ram_gib: float
    device: str = "cuda"  # "cuda" | "cpu"
    dtype: str = "float16"  # UNet / ControlNet / text encoders: "float16" | "bfloat16" | "float32"
    # SDXL's VAE overflows in float16; bfloat16 has float32's range. `choose_profile` resolves it per GPU.
    vae_dtype: str = "float32"
    offload: str = "none"  # "none" | "model" | "group"
    vae_tiling: bool = False
    # Decoding four 1024 px images at once needs more VRAM than the UNet; one at a time costs nothing.
    vae_slicing: bool = True
    default_short_side: int = 1024
    max_images: int = 4
    default_steps: int | None = None  # None: the request's own default
    # How the speeds' LoRAs apply (loras.py): "fused" into the weights, with the touched layers' originals kept
    # beside them (no per-step cost; the memory of those layers once more), or "adapter": peft's layers
    # switched on and off (no copy; their matmuls every step), where host RAM has no room for the copy.
    lora_mode: str = "fused"
    warning: str | None = None


# Weight sizes behind the estimates (fp16): UNet 4.8 GiB, IdentityNet 2.3 GiB, text encoders 1.5 GiB,
# IP-adapter + resampler 0.8 GiB, VAE 0.2 GiB: about 9.6 GiB in all, twice that in float32.
# The checkpoints are fp16, so UNet and ControlNet stay fp16 even where bf16 is available.
_RESIDENT_VRAM = "13.1 GB allocated for one 1024 px image (measured on an H200), plus about 2.5 GB per extra ControlNet"
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "zerogpu",
            "ZeroGPU: every model, the extras included, sits on the GPU in float16 from start-up, as ZeroGPU "
            "requires; each generation borrows half an NVIDIA RTX Pro 6000 Blackwell (48 GB).",
            _RESIDENT_VRAM + ", all resident",
            "about 17 GB: 16.9 GB of weights with every optional part (measured, bench load-memory --all-parts)",
            host_ram_gib=16,
            vae_dtype="bfloat16",
        ),
        Profile(
            "large",
            "GPUs with 19 GiB or more (A10G, L4, A100, RTX 3090/4090): everything stays on the GPU in float16; "
            "fastest.",
            _RESIDENT_VRAM,
            "about 12 GB while loading (estimate)",
            host_ram_gib=12,
        ),
        Profile(
            "medium",
            "GPUs with 11 to 19 GiB (T4 16 GB, 12 and 16 GB cards): each model moves to the GPU only while it "
            "runs (model offload) and the IdentityNet stays there; VAE tiling and slicing.",
            "9.9 GB reserved (9.5 GB allocated) for one 1024 px image (measured on an H200), plus about 2.5 GB per "
            "extra ControlNet",
            "about 11 GB (estimate): the offloaded weights live in host RAM",
            host_ram_gib=11,
            offload="model",
            lora_mode="adapter",
            vae_tiling=True,
            # Two images already mean a UNet batch of four with guidance: about what a T4 holds beside the weights.
            max_images=2,
        ),
        Profile(
            "small",
            "GPUs under 11 GiB (8 GB class): the UNet, ControlNet and text encoders stream to the GPU layer by "
            "layer with CUDA streams (group offload); VAE tiling and slicing; slower.",
            "5.7 GB reserved (2.9 GB allocated) for one 1024 px image (measured on an H200)",
            "about 13 GB (estimate): all weights live in (pinned) host RAM",
            host_ram_gib=13,
            offload="group",
            lora_mode="adapter",
            vae_tiling=True,
            max_images=2,
        ),
        Profile(
            "cpu",
            "No CUDA GPU: float32 on the CPU at 512 px, 20 steps, at most 2 images; very slow.",
            "none (CPU only)",
            "about 22 GB (estimate): float32 weights",
            host_ram_gib=22,
            device="cpu",
            dtype="float32",
            default_short_side=512,
            max_images=2,
            default_steps=20,
            warning="Running on the CPU: one 512 px image takes many minutes and needs about 22 GB of RAM "
            "(estimate). Duplicate this Space to GPU hardware for real use.",
        ),
    )
}

# The `cpu` profile where float32 does not fit (HF's free "CPU basic" has 16 GB): bfloat16 halves the weights.
# Slower than float32 on CPUs without native bf16 matmuls, but it loads instead of dying mid-load, the very
# failure this project exists to prevent.
CPU_BF16 = replace(
    PROFILES["cpu"],
    description="No CUDA GPU and under 22 GiB of RAM: bfloat16 on the CPU at 512 px, 20 steps, at most 2 images; "
    "very slow.",
    expected_host_ram="about 11.5 GB at load: 10.3 GB of bfloat16 weights (measured, bench load-memory --cpu-profile)",
    host_ram_gib=12,
    dtype="bfloat16",
    vae_dtype="bfloat16",
    warning="Running on the CPU in bfloat16 (this machine has too little RAM for float32): one 512 px image "
    "takes many minutes. Duplicate this Space to GPU hardware for real use.",
)

# The order the engine steps down after a CUDA out-of-memory error.
_LEANER = {"large": "medium", "medium": "small"}


def leaner_profile(profile: Profile) -> Profile | None:
    """The next profile that needs less VRAM, keeping this one's resolved VAE dtype; None at the bottom.

    ZeroGPU has no leaner step: its placement is fixed by the platform.
    """
    nxt = _LEANER.get(profile.name)
    return None if nxt is None else replace(PROFILES[nxt], vae_dtype=profile.vae_dtype)


def choose_profile(hw: Hardware, override: str = "auto", *, real_models: bool = True) -> tuple[Profile, str]:
    """Pick the profile for `hw` (or honour `override`) and a sentence saying why.

    A GPU profile asked for on a machine without CUDA falls back to `cpu` rather than failing at load. The
    `cpu` profile takes bfloat16 where the host RAM is short of float32's need. `real_models=False` (the tiny
    preset) skips every host-RAM rule: its models weigh megabytes.
    """
    override = (override or "auto").strip().lower()
    if override not in MEMORY_PROFILES:
        raise SettingsError(f"INSTANTID_MEMORY_PROFILE={override!r} is not one of: {', '.join(MEMORY_PROFILES)}.")

    if override == "auto":
        if hw.zerogpu:
            name = "zerogpu"
            reason = f"auto: ZeroGPU ({hw.gpu_name or ZEROGPU_NOMINAL_NAME}) -> zerogpu"
        elif not hw.cuda:
            name = "cpu"
            reason = "auto: no CUDA GPU found -> cpu"
        else:
            if hw.gpu_total_bytes >= LARGE_MIN_BYTES:
                name = "large"
            elif hw.gpu_total_bytes >= MEDIUM_MIN_BYTES:
                name = "medium"
            else:
                name = "small"
            reason = f"auto: {hw.gpu_name or 'CUDA GPU'} with {hw.gpu_total_bytes / GIB:.1f} GiB -> {name}"
    elif override != "cpu" and not hw.cuda:
        name = "cpu"
        reason = f"INSTANTID_MEMORY_PROFILE={override} needs a CUDA GPU, but none was found -> cpu"
    else:
        name = override
        reason = f"INSTANTID_MEMORY_PROFILE={override}"

    profile = PROFILES[name]
    if profile.device == "cuda":
        profile = replace(profile, vae_dtype="bfloat16" if hw.bf16 else "float32")

    def short_for(p: Profile) -> bool:
        return real_models and 0 < hw.host_total_bytes < p.host_ram_gib * GIB

    if profile.name == "cpu" and short_for(profile):
        reason += (
            f"; {hw.host_total_bytes / GIB:.1f} GiB of host RAM is below the about {profile.host_ram_gib:g} GiB "
            f"float32 needs -> bfloat16 weights"
        )
        profile = CPU_BF16
    # Host RAM is what ran out on Colab while loading; say so up front instead of dying mid-load.
    if short_for(profile):
        reason += (
            f"; warning: {hw.host_total_bytes / GIB:.1f} GiB of host RAM is below the "
            f"about {profile.host_ram_gib:g} GiB this profile needs (estimate)"
        )
    return profile, reason


# --------------------------------------------------------------------------------------------------
# Placement


def torch_dtype(name: str) -> Any:
    """The torch dtype for a profile's dtype string."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# Run every step (UNet, ControlNet) or hold most of the weights (text encoder 2): worth streaming.
_GROUP_OFFLOADED = ("unet", "controlnet", "text_encoder", "text_encoder_2")


def apply_profile(pipe: Any, profile: Profile, *, low_cpu_mem_usage: bool | None = None) -> None:
    """Place a diffusers pipeline as `profile` says: dtype of the VAE, VAE tiling/slicing, offload.

    The VAE is cast here because diffusers loads every component in one dtype and SDXL's VAE overflows
    in float16; the pipeline must therefore hand latents to the VAE in `vae.dtype`. Hooks from a previous
    model offload are removed first so the engine can step down after an out-of-memory
    error; group offload hooks are not removable, so leaving `small` means reloading.
    `low_cpu_mem_usage` (group offload only): pin host memory per transfer instead of up front, which
    avoids a second pinned copy of the weights; None decides from the host RAM available.
    """
    import torch

    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()

    vae = getattr(pipe, "vae", None)
    if vae is not None:
        target = torch_dtype(profile.vae_dtype)
        # Ideally the loader already loaded it in this dtype; casting again would only log a warning.
        if vae.dtype != target:
            vae.to(dtype=target)
        # Calling the VAE's own methods: the pipeline-level wrappers are deprecated in diffusers.
        if profile.vae_tiling:
            vae.enable_tiling()
        elif hasattr(vae, "disable_tiling"):
            vae.disable_tiling()
        if profile.vae_slicing:
            vae.enable_slicing()
        elif hasattr(vae, "disable_slicing"):
            vae.disable_slicing()

    if profile.device == "cpu":
        pipe.to("cpu")  # nothing below may touch CUDA: the CPU machine has none
        return

    if profile.offload == "none":
        pipe.to(profile.device)
    elif profile.offload == "model":
        pipe.enable_model_cpu_offload(device=profile.device)
        # The ControlNet runs every step next to the UNet, so offloading it would move 2.5 GB twice a
        # step; the pipeline lists it in `_exclude_from_cpu_offload` and it stays resident.
        if getattr(pipe, "controlnet", None) is not None:
            pipe.controlnet.to(profile.device)
    elif profile.offload == "group":
        components = getattr(pipe, "components", {})
        streamed = [n for n in _GROUP_OFFLOADED if isinstance(components.get(n), torch.nn.Module)]
        if low_cpu_mem_usage is None:
            low_cpu_mem_usage = _pinning_is_tight([components[n] for n in streamed])
        # Everything not streamed (VAE, resampler, image encoder) is small: diffusers places the excluded
        # modules on the onload device.
        pipe.enable_group_offload(
            onload_device=torch.device(profile.device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=True,
            low_cpu_mem_usage=low_cpu_mem_usage,
            exclude_modules=[n for n in components if n not in streamed],
        )
    else:
        raise ValueError(f"profile {profile.name!r} has an unknown offload mode {profile.offload!r}")


def _pinning_is_tight(modules: list[Any]) -> bool:
    """Pinning up front briefly holds a second copy of the streamed weights in host RAM."""
    needed = 0
    for module in modules:
        needed += sum(p.numel() * p.element_size() for p in module.parameters())
    return host_ram()[1] < needed + 2 * GIB
