"""The Status tab: the engine's report (models' load state, memory, profile, GPU seconds asked and used) as
the page shows it, the memory history it plots, and the tab's builder and wiring (`build_demo` in ui.py calls
them). The rendering functions are pure functions of the report; nothing here imports torch or the engine.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gradio as gr
import pandas as pd

STATUS_REFRESH_S = 4.0
# Samples of the memory plot the server keeps (one every 4 s: the last 10 minutes).
MAX_SAMPLES = 150
GIB = 1024**3

STATUS_COLUMNS = ["component", "device", "dtype", "size", "parameters", "offload"]


# --- status rendering (pure functions of the engine's report) --------------------------------------


def _gib(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value / GIB:.2f} GiB"


def _count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    if value >= 1e9:
        return f"{value / 1e9:.2f} B"
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return str(int(value))


def _bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


def format_load_state(report: Mapping[str, Any]) -> str:
    state = report.get("state") or {}
    phase = str(state.get("phase", "unknown"))
    message = str(state.get("message") or "")
    progress = state.get("progress")
    # "ready in 24.2 s" says the phase already: not "ready — ready in 24.2 s".
    repeats = bool(message) and message.lower().startswith(phase.lower())
    line = f"**Models:** {message if repeats else phase}"
    if phase == "loading" and isinstance(progress, (int, float)):
        line += f" `{_bar(float(progress))}` {float(progress) * 100:.0f} %"
    if message and not repeats:
        line += f" — {message}"
    if phase == "ready" and state.get("activity"):
        line += f"; {state['activity']}"
    startup = report.get("startup") or {}
    if startup.get("mode"):
        line += f"\n\n**Start-up:** {startup['mode']} ({startup.get('description', '')})"
    for name, reason in (startup.get("unavailable") or {}).items():
        line += f"\n\n**Unavailable:** {name}: {reason}"
    checkpoints = report.get("checkpoints") or []
    if checkpoints:
        line += "\n\n| Checkpoint | repo | revision | weights |\n|---|---|---|---|\n" + "\n".join(
            f"| {c.get('role')} | {c.get('repo')} | {c.get('revision')} | {c.get('weights')} |" for c in checkpoints
        )
    return line


def format_memory(report: Mapping[str, Any]) -> str:
    host = report.get("host") or {}
    lines = [
        "| Memory | amount |",
        "|---|---|",
        f"| Host RAM total | {_gib(host.get('total'))} |",
        f"| Host RAM available | {_gib(host.get('available'))} ({host.get('used_percent', 'n/a')} % used) |",
        f"| Process RSS | {_gib(host.get('process_rss'))} (peak {_gib(host.get('process_rss_peak'))}) |",
    ]
    gpu = report.get("gpu")
    if not gpu:
        lines.append("| GPU | no GPU: running on the CPU |")
    elif gpu.get("error"):
        lines.append(f"| GPU | unavailable: {gpu['error']} |")
    elif gpu.get("emulated"):
        lines.append(f"| GPU | {gpu.get('name', 'ZeroGPU')}: {gpu.get('note', 'attached only during a generation')} |")
    else:
        total, free = gpu.get("total"), gpu.get("free")
        used = total - free if isinstance(total, (int, float)) and isinstance(free, (int, float)) else None
        lines += [
            f"| GPU | {gpu.get('name', 'GPU')} |",
            f"| GPU used (all processes) | {_gib(used)} of {_gib(total)} |",
            f"| GPU allocated / reserved (this process) | {_gib(gpu.get('allocated'))} / {_gib(gpu.get('reserved'))} |",
            f"| GPU peak allocated | {_gib(gpu.get('peak_allocated'))} |",
        ]
    return "\n".join(lines)


def format_profile(report: Mapping[str, Any]) -> str:
    profile = report.get("profile") or {}
    if not profile:
        return "**Memory profile:** not chosen yet"
    parts = [f"**Memory profile:** `{profile.get('name', '?')}`"]
    details = ", ".join(
        f"{key} {profile[key]}" for key in ("device", "dtype", "offload") if profile.get(key) not in (None, "")
    )
    if details:
        parts.append(f"({details})")
    text = " ".join(parts)
    if profile.get("reason"):
        text += f"\n\n*Why:* {profile['reason']}"
    if profile.get("description"):
        text += f"\n\n{profile['description']}"
    if profile.get("warning"):
        text += f"\n\n**Warning:** {profile['warning']}"
    return text


def _seconds(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f} s" if isinstance(value, (int, float)) else "—"


# The requests the GPU-time table shows (the record keeps more, for its figures).
RECENT_SHOWN = 10


def format_durations(report: Mapping[str, Any]) -> str:
    """The GPU seconds recent requests asked ZeroGPU for and used, newest first, and the figures asked from."""
    section = report.get("durations") or {}
    if not section:
        return ""
    observed = section.get("observed") or {}
    if section.get("basis") == "observed":
        step = observed.get("step_s")
        basis = (
            f"from what this hardware has shown x {section.get('margin')}: fixed {_seconds(observed.get('fixed_s'))}, "
            f"a guided 1024x1024 step {_seconds(2 * step if isinstance(step, (int, float)) else None, 3)}"
        )
    else:
        basis = "from the prior for ZeroGPU's half RTX Pro 6000 Blackwell (nothing observed yet)"
    text = (
        f"**GPU time per request** (asked after `spaces`' factor x{section.get('factor')}, at most "
        f"{section.get('cap_s')} s): {basis}."
    )
    recent = list(section.get("recent") or [])[::-1][:RECENT_SHOWN]
    if not recent:
        return text + "\n\nNo request has run yet."
    text += f"\n\nThe last {RECENT_SHOWN} requests at most, newest first:"
    rows = "\n".join(
        f"| {r.get('request') or r.get('mode') or ''} | {r.get('steps')} | {r.get('images')} | {r.get('megapixels')} | "
        f"{'—' if r.get('asked_s') is None else str(r.get('asked_s')) + ' s'} ({r.get('basis')}) | "
        f"{_seconds(r.get('used_s'))} | {_seconds(r.get('gpu_function_s'))} |"
        for r in recent
    )
    header = "| Request | steps | images | MP | asked | used | in the GPU function |\n|---|---|---|---|---|---|---|"
    return f"{text}\n\n{header}\n{rows}"


def component_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for item in report.get("components") or []:
        size = item.get("size") or _gib(item.get("bytes"))
        rows.append(
            [
                item.get("name", "?"),
                item.get("device", ""),
                item.get("dtype") or "",
                size,
                _count(item.get("parameters")),
                item.get("offload") or "",
            ]
        )
    return rows


def add_sample(samples: Sequence[Mapping[str, Any]] | None, report: Mapping[str, Any], now: float) -> list[dict]:
    """Append one memory sample to a history and keep the last MAX_SAMPLES."""
    host = report.get("host") or {}
    gpu = report.get("gpu") or {}
    sample = {"t": now, "process RSS": host.get("process_rss")}
    if not gpu.get("emulated") and isinstance(gpu.get("allocated"), (int, float)):
        sample["GPU allocated"] = gpu.get("allocated")
        sample["GPU reserved"] = gpu.get("reserved")
    return [*list(samples or []), sample][-MAX_SAMPLES:]


class MemoryHistory:
    """The server's memory samples, shared by every visitor: the Status tab's chart shows the history so far
    whenever it is opened (it was kept per browser session and sampled only while that tab was open, so each
    reload or new visitor started from one point).

    Filled by a daemon thread (`start`) every STATUS_REFRESH_S, and by every status render; samples closer
    than half that interval are not added, so many open tabs do not crowd the history.
    """

    def __init__(self, max_samples: int = MAX_SAMPLES, min_gap_s: float = STATUS_REFRESH_S / 2) -> None:
        self.max_samples = max_samples
        self.min_gap_s = min_gap_s
        self._samples: list[dict] = []
        self._lock = threading.Lock()

    def record(self, report: Mapping[str, Any], now: float | None = None) -> list[dict]:
        """Add a sample from `report` (unless the newest is closer than min_gap_s); return the history."""
        now = time.time() if now is None else now
        with self._lock:
            if not self._samples or now - self._samples[-1]["t"] >= self.min_gap_s:
                self._samples = add_sample(self._samples, report, now)[-self.max_samples :]
            return list(self._samples)

    def samples(self) -> list[dict]:
        with self._lock:
            return list(self._samples)

    def start(self, report_fn: Callable[[], Mapping[str, Any]], every_s: float = STATUS_REFRESH_S) -> None:
        """Sample `report_fn()` every `every_s` seconds in a daemon thread, which ends once this history is gone
        (a demo built and dropped, as in the tests, leaves no sampler behind)."""
        ref = weakref.ref(self)

        def run() -> None:
            while True:
                # Sleep first: at start-up the main thread creates and loads the engine (on ZeroGPU before
                # `launch`, in that thread only); the first sample comes once it has.
                time.sleep(every_s)
                history = ref()
                if history is None:
                    return
                try:
                    history.record(report_fn())
                except Exception:  # a failing report shows in the tab itself; the chart just skips it
                    pass
                del history

        threading.Thread(target=run, name="instantid-memory-history", daemon=True).start()


def samples_frame(samples: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Long-form frame for the memory plot: seconds relative to the newest sample (0 = now), GiB, series."""
    rows = []
    newest = samples[-1]["t"] if samples else 0.0
    for sample in samples:
        for series, value in sample.items():
            if series != "t" and isinstance(value, (int, float)):
                rows.append({"seconds": round(sample["t"] - newest, 1), "GiB": round(value / GIB, 3), "series": series})
    return pd.DataFrame(rows, columns=["seconds", "GiB", "series"])


def render_status(report: Mapping[str, Any], samples: Sequence[Mapping[str, Any]] | None, now: float | None = None):
    """Everything the Status tab shows, from one report: (load, memory, plot, table, profile, json, samples)."""
    samples = add_sample(samples, report, time.time() if now is None else now)
    return (*render_outputs(report, samples), samples)


def render_outputs(report: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]):
    """The Status tab's outputs (load, memory, plot, table, profile, json) from a report and the samples so far."""
    return (
        format_load_state(report),
        format_memory(report),
        samples_frame(samples),
        pd.DataFrame(component_rows(report), columns=STATUS_COLUMNS),
        # The GPU seconds go under the profile: one Markdown, so the tab's outputs stay as they were.
        "\n\n".join(part for part in (format_profile(report), format_durations(report)) if part),
        dict(report),
    )


def safe_report(status_fn: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """`status_fn`'s report, or one that says why there is none (the page and the Status tab never fail on it)."""
    try:
        return dict(status_fn())
    except Exception as exc:  # gr.Error from the API layer, or a fake's failure
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return {"state": {"phase": "error", "message": f"status unavailable: {message}"}}


def wire_status(
    status_fn: Callable[[], Mapping[str, Any]], s: dict[str, Any], status_tab: Any, generate_tab: Any
) -> MemoryHistory:
    def status() -> dict[str, Any]:
        """Memory and model-loading report of the server: host RAM, process RSS and its peak, GPU memory,
        loaded components (device, dtype, size), the memory profile and why it was chosen, the load state, and
        the GPU seconds recent requests asked for (on ZeroGPU) and used.

        Returns:
            A JSON object with keys host, gpu (null without a GPU), components, profile, state and durations.
        """
        return dict(status_fn())

    # One history for every visitor, held by the handlers below (so by the demo): the thread that fills it
    # (`sample_memory`) ends with the demo.
    history = MemoryHistory()

    def refresh():
        report = safe_report(status_fn)
        return render_outputs(report, history.record(report))

    def render_report(report: Mapping[str, Any] | None):
        """The outputs for a report the page already holds (the JSON the `status` endpoint returned)."""
        return render_outputs(report or {}, history.record(report or {}))

    outputs = [s[name] for name in ("load_state", "memory", "plot", "components", "profile", "raw")]
    quiet: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    s["timer"].tick(refresh, None, outputs, **quiet)
    # The Refresh button is also the `status` API endpoint: outside the queue, so it answers while a
    # generation runs and never counts against the queue size. The page then renders the JSON it got.
    s["refresh_btn"].click(status, None, [s["raw"]], api_name="status", queue=False, show_progress="hidden").then(
        render_report, [s["raw"]], outputs, **quiet
    )
    # The page polls only while the Status tab is open; the history it draws is the server's, sampled all along.
    status_tab.select(lambda: gr.Timer(active=True), None, s["timer"], **quiet).then(refresh, None, outputs, **quiet)
    generate_tab.select(lambda: gr.Timer(active=False), None, s["timer"], **quiet)
    return history


def build_tab() -> dict[str, Any]:
    s: dict[str, Any] = {}
    with gr.Row():
        s["load_state"] = gr.Markdown("**Models:** …", elem_id="load-state")
        s["refresh_btn"] = gr.Button("Refresh", size="sm", scale=0, min_width=90, elem_id="refresh-status")
    with gr.Row(equal_height=False):
        with gr.Column():
            s["memory"] = gr.Markdown(elem_id="memory-table")
        with gr.Column():
            s["plot"] = gr.LinePlot(
                # Not an empty frame: Gradio 6 keeps the axis types of the first value it draws.
                value=None, x="seconds", y="GiB", color="series", x_title="seconds (0 = latest sample)",
                y_lim=[0, None], height=300, elem_id="memory-plot",
                # The title inside the chart: the block's label above it pushed the chart down, and the block's
                # fixed height then cut off the legend below it.
                title="Memory over time", label="Memory over time", show_label=False,
                # No title over the legend (it was the column's name, "series", then "Measure", which said
                # nothing): its entries name the series ("process RSS", "GPU allocated", ...).
                color_title="",
            )
    # Full width: the profile's sentences and the GPU-time table (seven columns, which broke words in half a
    # column: "Reque st").
    s["profile"] = gr.Markdown(elem_id="profile")
    s["components"] = gr.Dataframe(
        headers=STATUS_COLUMNS, label="Loaded components", interactive=False, elem_id="components"
    )
    with gr.Accordion("Status report (JSON)", open=False):
        s["raw"] = gr.JSON(label="Status report")
    s["timer"] = gr.Timer(STATUS_REFRESH_S, active=False)
    return s
