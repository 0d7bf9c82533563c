"""`python app.py` as a ZeroGPU Space runs it, emulated on a CPU machine (run by tests/test_zerogpu.py).

The real `spaces` package runs with SPACES_ZERO_GPU=true: it patches torch in the main process, hooks
`Blocks.launch` to pack what was placed on "cuda", schedules every GPU call through the device API (a stub
HTTP server on 127.0.0.1 that the test runs) and forks its GPU worker. Only what needs a real GPU is
stubbed, as little as `spaces`' own source (0.51) needs:

- `torch.version.cuda`, `torch._C._cuda_init` and `torch.cuda._is_in_bad_fork`: the CPU build has no first
  two and a lambda for the third (which a forked process cannot pickle back), and `spaces` reads all three;
- the worker's CUDA start (`spaces.zero.torch.init`) and its copy of the packed weights to the GPU
  (`spaces.zero.torch.move`): here the packed weights are read back into host memory instead, so the
  pipeline runs on the CPU inside the real worker process.

Before `spaces` packs, the harness writes what was loaded where (and from which thread) to
$ZEROGPU_FACTS, for the test to check that everything was resident before launch.

A slow worker on demand: while the file named by $ZEROGPU_SLOW_STEP_FILE exists, each denoising step in the
worker takes that many seconds longer (the file holds the number), for the duration tests.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.version.cuda = "12.8"  # type: ignore[misc] - what a CUDA build reports; spaces' static.py reads it


def _no_cuda_here() -> None:
    raise RuntimeError("CUDA's low-level init reached on a CPU machine")


def _not_in_bad_fork() -> bool:
    return False  # nothing initialised CUDA before `spaces` (there is none to initialise)


if not hasattr(torch._C, "_cuda_init"):
    torch._C._cuda_init = _no_cuda_here  # the CPU build has none; spaces keeps it to restore in the worker
# spaces asks a forked process; the CPU build's answer is a lambda, which cannot be pickled back.
torch.cuda._is_in_bad_fork = _not_in_bad_fork

import spaces  # noqa: E402,F401 - patches torch (the app imports it again, first, as a Space does)
import spaces.zero.torch as zero_torch  # noqa: E402
from spaces.zero.torch import patching  # noqa: E402


def _init_on_cpu(nvidia_uuid: str) -> None:
    # The real one initialises CUDA on the lent GPU. One CPU thread: the worker is a fork of a process whose
    # OpenMP pool it does not inherit.
    torch.set_num_threads(1)


def _move_to_host(callback=None) -> None:  # the signature spaces calls
    """The weights `spaces` packed at launch, read back from its pack files into host tensors."""
    for fake, original in patching.cuda_aliases.items():
        if original is not None:
            fake.data = original
    for pack in patching.tensor_packs:
        with open(pack.path(), "rb") as f:
            for meta, size, aligned in [t for batch in pack.batches for t in batch] + list(pack.big_tensors):
                raw = bytearray(f.read(aligned))[:size]
                storage = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()
                host = torch.empty(0, dtype=meta.dtype).set_(storage, 0, meta.shape, meta.stride())
                for fake in pack.fakes[meta]:
                    fake.data = host


def _facts() -> dict:
    """Where everything is, in the main thread just before `spaces` packs (inside the patched launch)."""
    from instantid.engine import get_engine

    engine = get_engine()
    pipe = engine.pipe

    def devices(module) -> list[str]:
        return sorted({str(p.device) for p in module.parameters()})

    modules = {}
    if pipe is not None:
        for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "resampler"):
            modules[name] = devices(getattr(pipe, name))
    for name, net in engine._extra_nets.items():
        modules[f"controlnet_{name}"] = devices(net)
    for name, est in engine._estimators.items():
        for role, module in est.modules().items():
            modules[f"{name}_{role}"] = devices(module)
    return {
        "thread": threading.current_thread().name,
        "background_thread": engine._thread is not None,
        "state": engine.state,
        "resident": engine.resident,
        "has_lcm": bool(engine.loras is not None and "lcm" in engine.loras.names),
        "unavailable": engine.unavailable,
        "modules": modules,
        "cuda_tensors": len(patching.cuda_aliases),
    }


_real_pack = zero_torch.pack


def _pack_after_recording() -> int:
    Path(os.environ["ZEROGPU_FACTS"]).write_text(json.dumps(_facts()))
    return _real_pack()


def _slow_steps() -> None:
    """Each denoising step sleeps as long as $ZEROGPU_SLOW_STEP_FILE says, read at every step in the worker."""
    from instantid.engine import Engine

    slow_file = Path(os.environ.get("ZEROGPU_SLOW_STEP_FILE") or os.devnull)
    real_render = Engine.render

    def render(self, job, progress=None, preview=None):
        def step(done: int, total: int) -> None:
            try:
                time.sleep(float(slow_file.read_text()))
            except (OSError, ValueError):  # no file (or an empty one): a worker at its usual speed
                pass
            if progress is not None:
                progress(done, total)

        return real_render(self, job, step, preview)

    Engine.render = render


_slow_steps()
zero_torch.init = _init_on_cpu
zero_torch.move = _move_to_host
zero_torch.pack = _pack_after_recording

runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
