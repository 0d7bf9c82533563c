"""Gradio builders: the Generate tab and the Status tab.

`build_demo` receives the functions it wires up (the real ones live in `instantid.api`; tests pass
fakes), so nothing here imports torch or the engine. The generate function's parameters must be in
the order of `generate_inputs` below: Gradio names the API parameters after the function's signature.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gradio as gr
import pandas as pd

from .errors import InvalidParameter
from .requests import (
    API_KINDS,
    DEFAULT_CONTROLNET_STRENGTH,
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    LCM_GUIDANCE,
    LCM_STEPS,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    MAX_STRENGTH,
    SCHEDULERS,
    check_kind,
    format_bound,
    random_seed,
)
from .settings import CONTROLNET_NAMES, Settings
from .styles import NO_STYLE, STYLE_NAMES

STATUS_REFRESH_S = 4.0
# Samples of the memory plot kept per browser session (at one every 4 s: the last 4 minutes).
MAX_SAMPLES = 60
GIB = 1024**3

TITLE = "InstantID: identity-preserving generation from one photo"
INTRO = """
Upload a photo with a face, describe the picture you want, and press **Generate**. The person's identity
comes from the photo ([InstantID](https://github.com/instantX-research/InstantID) on SDXL); the rest comes
from the prompt and the style. Optional: more photos of the same person (averaged), and a pose photo whose
face position (and body pose, edges or depth, with the extra ControlNets) the result follows.
Use it from code with `gradio_client` (see "Use via API" at the bottom of the page).
"""

STEPS_INFO = f"0 = automatic ({DEFAULT_STEPS}, or {LCM_STEPS} with LCM)"
GUIDANCE_INFO = f"0 = automatic ({DEFAULT_GUIDANCE:g}, or {LCM_GUIDANCE:g} with LCM); 1 or less turns guidance off"
STATUS_COLUMNS = ["component", "device", "dtype", "size", "parameters", "offload"]


# Every `frequency` seconds Gradio deletes the uploads and results this app wrote more than `age` seconds
# ago (gr.Blocks(delete_cache=...)): uploads never pile up on the Space's disk.
DELETE_CACHE = (1800, 3600)


# --- input checks that name the API parameter --------------------------------------------------------


def _input_error(component: Any, name: str, value: Any, exc: Exception) -> str:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
    if lo is not None and hi is not None:
        step = getattr(component, "step", None)
        if getattr(component, "precision", None) == 0 or step == 1:
            kind = "an integer"
        elif isinstance(step, int) and step > 1:
            kind = f"a multiple of {step}"
        else:
            kind = "a number"
        return f"Invalid {name}={shown}: must be {kind} in {format_bound(lo)}..{format_bound(hi)}."
    choices = getattr(component, "choices", None)
    if choices:
        names = [str(c[1]) if isinstance(c, tuple) else str(c) for c in choices]
        return f"Invalid {name}={shown}: choose from {', '.join(names)}."
    reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"Invalid {name}={shown}: {reason}"


def guard_input(component: Any, name: str) -> None:
    """Make Gradio's own checks of an API input say which parameter they refuse, and why.

    Gradio says "Value 1000 is greater than maximum value 100." without naming which of 22 parameters it
    means, and a value of the wrong type becomes an anonymous server error; callers get one sentence
    naming the parameter, the value and what is allowed instead. Photo uploads are handed over
    untouched: Gradio would open them with PIL first, so a file that is not an image would also end as
    an anonymous error, while `instantid.images` refuses it (or a bomb) with a sentence that says what
    to do. Gradio has already checked that an upload's path lies in its own cache, never elsewhere.
    Patched on the instance: a component subclass would make Gradio write a `.pyi` stub next to this file.
    """
    original = component.preprocess
    hand_over = isinstance(component, gr.Image) and component.type == "filepath" and component.image_mode is None
    kind = API_KINDS.get(name)

    def preprocess(payload: Any) -> Any:
        if kind is not None:
            # The value as sent, before Gradio converts it (it would read "false" as true, round 3.7).
            try:
                check_kind(name, payload, kind)
            except InvalidParameter as exc:
                # A number of the right type but not whole: say the range too, as for any other number.
                ranged = isinstance(payload, (int, float)) and not isinstance(payload, bool)
                message = _input_error(component, name, payload, exc) if ranged else str(exc)
                raise gr.Error(message, print_exception=False) from None
        if hand_over and payload is not None and not (payload.url or "").startswith("data:"):
            if not payload.path:
                # An object with only a URL: Gradio fetched nothing, and its own message would print the object.
                raise gr.Error(
                    f"Invalid {name}: send the photo itself as an upload (gradio_client: handle_file(path)); a "
                    "URL or a path on the server is never read.",
                    print_exception=False,
                )
            return str(payload.path)
        try:
            return original(payload)
        except Exception as exc:  # every refusal of a value gets the same kind of sentence
            raise gr.Error(_input_error(component, name, payload, exc), print_exception=False) from None

    component.preprocess = preprocess


# --- cheap UI steps (queue=False, no API) ----------------------------------------------------------


def lcm_defaults(enable_lcm: bool) -> tuple[int, float]:
    """Steps and guidance to show when LCM fast mode is switched on or off, as the official Space does."""
    return (LCM_STEPS, LCM_GUIDANCE) if enable_lcm else (DEFAULT_STEPS, DEFAULT_GUIDANCE)


def next_seed(seed: float | None, randomize_seed: bool) -> int:
    """The seed the next generation uses: a fresh random one when asked for, else the one shown."""
    if randomize_seed or seed is None:
        return random_seed()
    return int(min(max(int(seed), 0), MAX_SEED))


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
    line = f"**Models:** {phase}"
    if phase == "loading" and isinstance(progress, (int, float)):
        line += f" `{_bar(float(progress))}` {float(progress) * 100:.0f} %"
    if message:
        line += f" — {message}"
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
        "| Memory | |",
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
    """Append one memory sample to the per-session history (kept in gr.State) and keep the last MAX_SAMPLES."""
    host = report.get("host") or {}
    gpu = report.get("gpu") or {}
    sample = {"t": now, "process RSS": host.get("process_rss")}
    if not gpu.get("emulated") and isinstance(gpu.get("allocated"), (int, float)):
        sample["GPU allocated"] = gpu.get("allocated")
        sample["GPU reserved"] = gpu.get("reserved")
    return [*list(samples or []), sample][-MAX_SAMPLES:]


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
    return (
        format_load_state(report),
        format_memory(report),
        samples_frame(samples),
        pd.DataFrame(component_rows(report), columns=STATUS_COLUMNS),
        format_profile(report),
        dict(report),
        samples,
    )


def render_report(report: Mapping[str, Any] | None, samples: Sequence[Mapping[str, Any]] | None):
    """`render_status` for a report the page already holds (the JSON the `status` endpoint returned)."""
    return render_status(report or {}, samples)


# --- the app -----------------------------------------------------------------------------------------


TINY_BANNER = (
    "**Tiny preset: random tiny weights, so the images are noise.** Every code path runs, offline, but nothing "
    "here was trained. For the real models unset `INSTANTID_PRESET` (with network access, or with the "
    "checkpoints already in the Hugging Face cache and `HF_HUB_OFFLINE=1`)."
)


def build_demo(
    generate_fn: Callable[..., Any],
    status_fn: Callable[[], Mapping[str, Any]],
    *,
    settings: Settings,
    examples: list[list[Any]] | None = None,
) -> gr.Blocks:
    """Build the Blocks app.

    generate_fn: takes the inputs listed in `generate_inputs` (same order, same names as
      `instantid.api.generate`, plus an optional `progress=gr.Progress()`), returns (gallery, seed,
      similarities, keypoint image, timings); raises gr.Error for user-facing problems.
    status_fn: returns the engine's JSON-ready report.
    examples: rows of [face photo path, prompt, style].
    """
    max_side = max(64, settings.max_output_side // 64 * 64)
    with gr.Blocks(title="InstantID", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}", elem_id="intro")
        if settings.preset == "tiny":
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate") as generate_tab:
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        face_image = gr.Image(
                            label="Face photo",
                            type="filepath",
                            image_mode=None,  # hand the file over untouched; instantid.images decodes it
                            sources=["upload", "webcam", "clipboard"],
                            height=360,
                            elem_id="face-image",
                        )
                        prompt = gr.Textbox(
                            label="Prompt",
                            placeholder="e.g. a woman as an astronaut on Mars, cinematic light",
                            lines=2,
                            elem_id="prompt",
                        )
                        with gr.Row():
                            style = gr.Dropdown(label="Style", choices=list(STYLE_NAMES), value=NO_STYLE)
                            num_images = gr.Slider(
                                label="Number of images", minimum=1, maximum=MAX_IMAGES, step=1, value=1
                            )
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        with gr.Accordion("More photos and a pose reference", open=False):
                            extra_face_images = gr.File(
                                label="More photos of the same person (optional, averaged)",
                                file_count="multiple",
                                file_types=["image"],
                                type="filepath",
                            )
                            pose_image = gr.Image(
                                label="Pose photo (optional)",
                                type="filepath",
                                image_mode=None,
                                sources=["upload", "webcam", "clipboard"],
                                height=240,
                            )
                        negative_prompt = gr.Textbox(
                            label="Negative prompt", placeholder="what to avoid (optional)", lines=1, value=""
                        )
                        with gr.Accordion("Advanced settings", open=False):
                            with gr.Row():
                                # 0 is "automatic" for the API; the page shows the explicit defaults (load below).
                                num_steps = gr.Slider(
                                    label="Steps",
                                    info=STEPS_INFO,
                                    minimum=0,
                                    maximum=MAX_STEPS,
                                    step=1,
                                    value=0,
                                )
                                guidance_scale = gr.Slider(
                                    label="Guidance scale",
                                    info=GUIDANCE_INFO,
                                    minimum=0,
                                    maximum=20,
                                    step=0.1,
                                    value=0,
                                )
                            with gr.Row():
                                identitynet_strength = gr.Slider(
                                    label="IdentityNet strength (face layout)",
                                    minimum=0,
                                    maximum=MAX_STRENGTH,
                                    step=0.05,
                                    value=DEFAULT_STRENGTH,
                                )
                                adapter_strength = gr.Slider(
                                    label="Adapter strength (identity detail)",
                                    minimum=0,
                                    maximum=MAX_STRENGTH,
                                    step=0.05,
                                    value=DEFAULT_STRENGTH,
                                )
                            with gr.Row():
                                width = gr.Slider(
                                    label="Width", info="0 = automatic", minimum=0, maximum=max_side, step=64, value=0
                                )
                                height = gr.Slider(
                                    label="Height", info="0 = automatic", minimum=0, maximum=max_side, step=64, value=0
                                )
                            controlnets = gr.CheckboxGroup(
                                label="Extra ControlNets (from the pose photo, or the face photo)",
                                choices=list(CONTROLNET_NAMES),
                                value=[],
                            )
                            with gr.Row():
                                pose_strength = gr.Slider(
                                    label="Pose strength", minimum=0, maximum=MAX_STRENGTH, step=0.05,
                                    value=DEFAULT_CONTROLNET_STRENGTH,
                                )
                                canny_strength = gr.Slider(
                                    label="Canny strength", minimum=0, maximum=MAX_STRENGTH, step=0.05,
                                    value=DEFAULT_CONTROLNET_STRENGTH,
                                )
                                depth_strength = gr.Slider(
                                    label="Depth strength", minimum=0, maximum=MAX_STRENGTH, step=0.05,
                                    value=DEFAULT_CONTROLNET_STRENGTH,
                                )
                            with gr.Row():
                                scheduler = gr.Dropdown(
                                    label="Scheduler", choices=list(SCHEDULERS), value=DEFAULT_SCHEDULER
                                )
                                enable_lcm = gr.Checkbox(
                                    label="LCM fast mode", info="few steps, lower quality", value=False
                                )
                            with gr.Row():
                                seed = gr.Number(
                                    label="Seed", value=42, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed"
                                )
                                randomize = gr.Checkbox(label="Randomize seed", value=True)
                            enhance_face_region = gr.Checkbox(label="Enhance face region", value=True)
                            # The page randomizes in a cheap step of its own (so the seed shows before the
                            # result); API callers get the flag through this hidden twin, which the page leaves off.
                            api_randomize = gr.Checkbox(label="Randomize seed", value=False, visible=False)
                    with gr.Column(scale=1):
                        gallery = gr.Gallery(
                            label="Results",
                            format="png",
                            columns=2,
                            height=520,
                            object_fit="contain",
                            buttons=["download", "fullscreen"],
                            interactive=False,
                            elem_id="gallery",
                        )
                        with gr.Row():
                            similarities = gr.JSON(label="Identity similarity", height=120)
                            timings = gr.JSON(label="Timings (ms)", height=120)
                        keypoints = gr.Image(
                            label="Face keypoints",
                            type="pil",
                            format="png",
                            interactive=False,
                            height=240,
                        )
                if examples:

                    def run_example(face: str, prompt_text: str, style_name: str) -> Any:
                        # Every other input keeps its default, so a cached example stays valid.
                        return generate_fn(face, prompt_text, style=style_name)

                    gr.Examples(
                        examples=examples,
                        inputs=[face_image, prompt, style],
                        outputs=[gallery, seed, similarities, keypoints, timings],
                        fn=run_example,
                        # Lazily: each example is generated on its first click, then served from the cache;
                        # eager caching would spend a full SDXL generation per example at start-up.
                        cache_examples=True,
                        cache_mode="lazy",
                        api_visibility="private",
                        label="Examples (click one: generated once, then served from the cache)",
                    )

            with gr.Tab("Status", id="status") as status_tab:
                with gr.Row():
                    load_state = gr.Markdown("**Models:** …", elem_id="load-state")
                    refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh-status")
                with gr.Row(equal_height=False):
                    with gr.Column():
                        memory = gr.Markdown(elem_id="memory-table")
                        profile = gr.Markdown(elem_id="profile")
                    with gr.Column():
                        plot = gr.LinePlot(
                            # Not an empty frame: Gradio 6 keeps the axis types of the first value it draws.
                            value=None,
                            x="seconds",
                            y="GiB",
                            color="series",
                            x_title="seconds (0 = latest sample)",
                            y_lim=[0, None],
                            label="Memory over time",
                            height=300,
                        )
                components = gr.Dataframe(
                    headers=STATUS_COLUMNS,
                    label="Loaded components",
                    interactive=False,
                    elem_id="components",
                )
                with gr.Accordion("Status report (JSON)", open=False):
                    raw = gr.JSON(label="Status report")
                samples = gr.State([])
                timer = gr.Timer(STATUS_REFRESH_S, active=False)

        # -- wiring ------------------------------------------------------------------------------
        generate_inputs = [
            face_image, prompt, extra_face_images, pose_image, negative_prompt, style, num_images, width, height,
            num_steps, guidance_scale, identitynet_strength, adapter_strength, controlnets, pose_strength,
            canny_strength, depth_strength, scheduler, enable_lcm, seed, api_randomize, enhance_face_region,
        ]
        generate_outputs = [gallery, seed, similarities, keypoints, timings]
        for name, component in zip(inspect.signature(generate_fn).parameters, generate_inputs, strict=False):
            guard_input(component, name)

        # The defaults the page shows; the components themselves hold 0 so API callers get "automatic".
        demo.load(None, None, [num_steps, guidance_scale], js=f"() => [{DEFAULT_STEPS}, {DEFAULT_GUIDANCE}]")

        enable_lcm.change(
            lcm_defaults, [enable_lcm], [num_steps, guidance_scale],
            queue=False, api_visibility="private", show_progress="hidden",
        )
        gr.on(
            [generate_btn.click, prompt.submit],
            next_seed, [seed, randomize], [seed],
            queue=False, api_visibility="private", show_progress="hidden",
        ).then(
            generate_fn,
            generate_inputs,
            generate_outputs,
            api_name="generate",
            show_progress_on=[gallery],
        )

        def status() -> dict[str, Any]:
            """Memory and model-loading report of the server: host RAM, process RSS and its peak, GPU memory,
            loaded components (device, dtype, size), the memory profile and why it was chosen, and the load state.

            Returns:
                A JSON object with keys host, gpu (null without a GPU), components, profile and state.
            """
            return dict(status_fn())

        def safe_report() -> dict[str, Any]:
            try:
                return dict(status_fn())
            except Exception as exc:  # gr.Error from the API layer, or a fake's failure
                message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                return {"state": {"phase": "error", "message": f"status unavailable: {message}"}}

        def refresh(history: list[dict]):
            return render_status(safe_report(), history)

        status_outputs = [load_state, memory, plot, components, profile, raw, samples]
        quiet: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        timer.tick(refresh, [samples], status_outputs, **quiet)
        # The Refresh button is also the `status` API endpoint: outside the queue, so it answers while a
        # generation runs and never counts against the queue size. The page then renders the JSON it got.
        refresh_btn.click(
            status, None, [raw], api_name="status", queue=False, show_progress="hidden"
        ).then(render_report, [raw, samples], status_outputs, **quiet)
        # Poll only while the Status tab is open.
        status_tab.select(lambda: gr.Timer(active=True), None, timer, **quiet).then(
            refresh, [samples], status_outputs, **quiet
        )
        generate_tab.select(lambda: gr.Timer(active=False), None, timer, **quiet)
    return demo
