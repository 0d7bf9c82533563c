"""The JSON-ready memory report: what each loaded component holds and where, the host's and the GPU's memory.

torch is imported inside the functions that need it: `format_bytes` stays importable by the UI without paying
torch's start-up cost. On ZeroGPU, real GPU figures are read only when CUDA is already initialised (inside a
GPU call): see memory.py.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from .memory import ZEROGPU_NOMINAL_NAME, Profile, host_ram, is_zerogpu

# --------------------------------------------------------------------------------------------------
# Measuring


def format_bytes(n: int | None) -> str:
    """Human-readable binary size: 1.23 GiB; "n/a" for None."""
    if n is None:
        return "n/a"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(abs(n)), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    sign = "-" if n < 0 else ""
    return f"{sign}{int(value)} B" if i == 0 else f"{sign}{value:.2f} {units[i]}"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _offload_info(module: Any) -> tuple[str | None, str | None]:
    """(kind, execution device) of the offload hooks on `module`; best effort, (None, None) if none.

    diffusers group offload keeps a hook registry in `_diffusers_hook`; accelerate puts a `CpuOffload`
    `_hf_hook` on the top module for model offload.
    """
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "get_hook"):
            hook = registry.get_hook("group_offloading")
            if hook is not None:
                config = getattr(hook, "config", None)
                onload = getattr(config, "onload_device", None)
                return "group", None if onload is None else str(onload)
        hf_hook = getattr(sub, "_hf_hook", None)
        for hook in (getattr(hf_hook, "hooks", None) or (hf_hook,)) if hf_hook is not None else ():
            if type(hook).__name__ == "CpuOffload":  # a SequentialHook may wrap it among others
                exec_device = getattr(hook, "execution_device", None)
                if isinstance(exec_device, int):
                    exec_device = f"cuda:{exec_device}"
                return "model", None if exec_device is None else str(exec_device)
    return None, None


def component_info(name: str, module: Any, only: Callable[[str], bool] | None = None) -> dict[str, object]:
    """Where one torch module lives and how much memory it holds.

    bytes counts parameters and buffers, each storage once (tied weights and views share one). On the
    meta device nothing is allocated, so bytes is what the module would take once materialised.
    `only(name)` keeps the parameters and buffers whose names it accepts (an adapter inside a model).
    """
    import torch

    devices: set[str] = set()
    dtype_elems: Counter[str] = Counter()
    seen: set[object] = set()
    total_bytes = 0
    n_params = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total_bytes
        devices.add(str(t.device))
        if t.device.type == "meta":
            key: object = ("meta", id(t))
            size = t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr(), storage.nbytes())
            size = storage.nbytes()
        if key not in seen:
            seen.add(key)
            total_bytes += size

    for pname, p in module.named_parameters():
        if only is not None and not only(pname):
            continue
        count(p)
        n_params += p.numel()
        dtype_elems[_dtype_name(p.dtype)] += p.numel()
    buffer_dtypes: Counter[str] = Counter()
    for bname, b in module.named_buffers():
        if only is not None and not only(bname):
            continue
        count(b)
        buffer_dtypes[_dtype_name(b.dtype)] += b.numel()

    common = (dtype_elems or buffer_dtypes).most_common(1)
    if not devices:
        device = "none"
    elif len(devices) == 1:
        device = next(iter(devices))
    else:
        device = f"mixed ({', '.join(sorted(devices))})"
    offload, execution_device = _offload_info(module)
    return {
        "name": name,
        "class": type(module).__name__,
        "device": device,
        "dtype": common[0][0] if common else None,
        "bytes": total_bytes,
        "size": format_bytes(total_bytes),
        "parameters": n_params,
        "offload": offload,
        "execution_device": execution_device,
    }


def host_memory() -> dict[str, object]:
    """Host RAM in bytes: machine total/available and this process's resident set and its peak."""
    import psutil

    total, available, _ = host_ram()
    rss = psutil.Process().memory_info().rss
    peak: int | None
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        peak = int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024
        # The kernel updates its high-water mark lazily, so it can trail the RSS read a moment ago.
        peak = max(peak, int(rss))
    except (ImportError, OSError):  # no `resource` on Windows
        peak = None
    return {
        "total": total,
        "available": available,
        "process_rss": int(rss),
        "process_rss_peak": peak,
        "used_percent": round(100.0 * (total - available) / total, 1) if total else 0.0,
    }


def _cuda_ready(zerogpu: bool) -> bool:
    """True when asking torch.cuda for memory is both meaningful and safe."""
    torch = sys.modules.get("torch")
    if torch is None:
        if zerogpu:
            return False  # nothing has touched torch yet, let alone real CUDA
        import torch
    if zerogpu:
        # Real CUDA is only initialised inside a GPU call; outside one, `spaces` fakes availability.
        return bool(torch.cuda.is_initialized())
    return bool(torch.cuda.is_available())


def gpu_memory(*, zerogpu: bool | None = None) -> dict[str, object] | None:
    """GPU 0's memory in bytes, None without CUDA. Never raises.

    On ZeroGPU outside a generation the numbers would be fake, so it returns `emulated: True` and a note.
    """
    zerogpu = is_zerogpu() if zerogpu is None else zerogpu
    try:
        ready = _cuda_ready(zerogpu)
    except Exception as exc:  # a status page must not take the app down with it
        return {"error": f"{type(exc).__name__}: {exc}"} if not zerogpu else _emulated_gpu()
    if not ready:
        return _emulated_gpu() if zerogpu else None
    import torch

    try:
        free, total = torch.cuda.mem_get_info()
        return {
            "name": torch.cuda.get_device_name(0),
            "total": int(total),
            "free": int(free),
            "allocated": int(torch.cuda.memory_allocated()),
            "reserved": int(torch.cuda.memory_reserved()),
            "peak_allocated": int(torch.cuda.max_memory_allocated()),
            "peak_reserved": int(torch.cuda.max_memory_reserved()),
            "emulated": False,
        }
    except Exception as exc:  # a status page must not take the app down with it
        if zerogpu:
            return _emulated_gpu()
        return {"error": f"{type(exc).__name__}: {exc}"}


def _emulated_gpu() -> dict[str, object]:
    return {
        "emulated": True,
        "name": ZEROGPU_NOMINAL_NAME,
        "note": "On ZeroGPU the GPU is only attached during a generation, so GPU memory is only real inside one; "
        "the peak of the last generation is in the generation's own report.",
    }


def memory_report(
    *,
    components: Mapping[str, object],
    profile: Profile,
    reason: str,
    state: Mapping[str, object],
) -> dict[str, object]:
    """Everything the status tab and the `status` command show, ready for `json.dumps`.

    `components` maps names to torch modules, or to (module, only) to list a part of one (see
    `component_info`); None and non-modules (schedulers, tokenizers) are skipped.
    """
    import torch

    infos = []
    for name, entry in components.items():
        module, only = entry if isinstance(entry, tuple) else (entry, None)
        # Pipelines also hold schedulers and tokenizers; only torch modules hold memory worth listing.
        if isinstance(module, torch.nn.Module):
            infos.append(component_info(name, module, only))
    sizes = [int(info["bytes"]) for info in infos]  # type: ignore[call-overload]
    order = sorted(range(len(infos)), key=lambda i: (-sizes[i], str(infos[i]["name"])))
    infos = [infos[i] for i in order]
    total_bytes = sum(sizes)
    total_params = sum(int(info["parameters"]) for info in infos)  # type: ignore[call-overload]
    report: dict[str, object] = {
        "host": host_memory(),
        "gpu": gpu_memory(),
        "components": infos,
        "components_total": {"bytes": total_bytes, "size": format_bytes(total_bytes), "parameters": total_params},
        "profile": {
            "name": profile.name,
            "reason": reason,
            "description": profile.description,
            "device": profile.device,
            "dtype": profile.dtype,
            "vae_dtype": profile.vae_dtype,
            "offload": profile.offload,
            "expected_vram": profile.expected_vram,
            "warning": profile.warning,
        },
        "state": dict(state),
    }
    # `state` comes from the caller; anything json cannot encode becomes its str() rather than an error.
    return json.loads(json.dumps(report, default=str))
