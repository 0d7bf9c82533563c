"""Measuring a load's resident memory, shared by load_memory.py and all_parts.py (both import it; neither
imports the other): the RSS watch, the imports done before it starts, and touching every weight page.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class RSSWatch:
    """Resident set size now, at start, and its peak (polled, and the kernel's high-water mark)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start = self.now()
        self.peak = self.start
        # (label, RSS growth, anonymous growth): the split tells a second copy in RAM (anonymous) from
        # file pages that are only mapped (memory-mapped weights, counted in RSS once read).
        self.marks: list[tuple[str, int, int]] = []
        self._anon0 = _rss_anon()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._hwm0 = _hwm()

    def now(self) -> int:
        return int(self._proc.memory_info().rss)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self._interval)

    def __enter__(self) -> RSSWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _hwm()
        # The high-water mark only counts when the load raised it above where imports had left it.
        if hwm > self._hwm0:
            self.peak = max(self.peak, hwm)
        self.peak = max(self.peak, self.now())

    def mark(self, label: str) -> None:
        rss = self.now()
        self.peak = max(self.peak, rss)
        self.marks.append((label, rss - self.start, _rss_anon() - self._anon0))

    def result(self, seconds: float) -> dict[str, Any]:
        """What every load measure reports: peak and end RSS growth, load time, the marked stages."""
        return {
            "peak_rss_bytes": self.peak - self.start,
            "end_rss_bytes": self.now() - self.start,
            "load_seconds": round(seconds, 2),
            "stages": [[label, delta, anon] for label, delta, anon in self.marks],
        }


def _rss_anon() -> int:
    """RssAnon: the part of RSS that is anonymous memory (Linux), 0 where unknown."""
    return _status_kib("RssAnon:")


def _hwm() -> int:
    """VmHWM: the kernel's exact peak RSS of this process (Linux), 0 where unknown."""
    return _status_kib("VmHWM:")


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def import_all() -> None:
    # Everything either loader imports, so RSS growth is the load alone.
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionXLControlNetPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    import instantid.engine
    import instantid.models.attention
    import instantid.models.loading
    import instantid.models.pipeline
    import instantid.models.resampler  # noqa: F401


def touch(modules: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for module in modules.values():
            for t in [*module.parameters(), *module.buffers()]:
                flat = t.detach().reshape(-1)
                step = max(1, 4096 // t.element_size())  # one element per 4 KiB page
                if flat.numel():
                    flat[::step].float().sum()
