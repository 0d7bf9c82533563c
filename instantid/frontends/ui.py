"""Gradio builders: the Create tab (with its modes: Generate, Restyle, Face swap, Group) and the Status tab
(status_tab.py).

`build_demo` receives the functions it wires up, one per mode (the real ones live in `instantid.frontends.api`;
tests pass fakes), so nothing here imports torch or the engine. Each takes its mode's parameters in the order
`instantid.declaration.params_for(mode)` declares: Gradio names the API parameters after the function's
signature. The modes' labels and buttons are their records' (`instantid.declaration.MODE_SPECS`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import gradio as gr

from ..declaration import (
    DEFAULT_CONTROLNET_STRENGTH,
    MAX_SEED,
    MAX_STRENGTH,
    MODE_SPECS,
    MODES,
    PARAMS,
    Param,
    labelled_sentence,
    params_for,
    random_seed,
)
from ..errors import InvalidParameter, UserError
from ..request.requests import Partial, Request
from ..settings import CONTROL_TYPES, Settings
from ..vision import framing
from .gradio_adapter import KEEP_TYPED_NUMBERS_JS, guard_input
from .hints import MODE_NOTES, PageFacts, wire_estimates, wire_layout_preview, working_short_side
from .status_tab import build_tab, safe_report, wire_status

TITLE = "InstantID: identity-preserving generation from one photo"
# What a phone shows above the inputs: two lines at 390 px (the rest waits in ABOUT, closed). The API link opens
# Gradio's own API page (`?view=api`, what the footer's "Use via API" opens; Gradio hides that on phones).
INTRO = """
Upload a face photo, describe the picture, press **Generate**: the result keeps the person's identity
([InstantID](https://github.com/instantX-research/InstantID) on SDXL). From code: [Use via API](?view=api).
"""
ABOUT = """
The person's identity comes from the photo; the rest comes from the prompt and the style. Optional: more photos
of the same person (averaged), and a pose photo whose face position (and body pose, edges or depth, with the
extra ControlNets) the result follows. Three more modes: **Restyle** redraws a photo of your choice with the
person's identity, **Face swap** puts the person's face into another photo (and leaves the rest of it as it
was), **Group** puts two to four people in one picture, each with their own identity in their own place
(placed as in a layout photo, or side by side).

Use it from code with `gradio_client`: [Use via API](?view=api) (also at the bottom of the page) lists every
endpoint with its parameters.
"""


# Every `frequency` seconds Gradio deletes the uploads and results this app wrote more than `age` seconds
# ago (gr.Blocks(delete_cache=...)): uploads never pile up on the Space's disk.
DELETE_CACHE = (1800, 3600)


# --- cheap UI steps (queue=False, no API) ----------------------------------------------------------


def automatic_steps(_changed: object) -> tuple[int, float]:
    """Steps and guidance when the speed or LCM changes: back to 0, "automatic", which follows the choice (and
    the server's profile: 20 quality steps on the CPU), as the API's defaults do."""
    return 0, 0.0


def next_seed(seed: float | None, randomize_seed: bool) -> int:
    """The seed the next generation uses: a fresh random one when asked for, else the one shown."""
    if randomize_seed or seed is None:
        return random_seed()
    return int(min(max(int(seed), 0), MAX_SEED))


def start_run(seed: float | None, randomize: bool, chosen: list[str] | None, *strengths: float) -> tuple[Any, ...]:
    """The page's step before a generation: the seed to show, the extra ControlNets as the API's mapping
    ({name: strength} from the ticked boxes and their sliders), and the previous run's results cleared (so
    an error never leaves them on screen as if they were this run's)."""
    mapping = {name: float(s) for name, s in zip(CONTROL_TYPES, strengths, strict=True) if name in (chosen or [])}
    return next_seed(seed, randomize), mapping, None, None, None, None, None, ""


# Stages of the timings report, in the order a request runs them; any other stage is named as it comes.
STAGES = {
    "faces_ms": "faces", "conditions_ms": "conditions", "controls_ms": "extra controls", "encode_ms": "prompt",
    "denoise_ms": "denoising", "decode_ms": "decoding", "paste_ms": "paste", "identity_check_ms": "identity check",
}


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def timings_line(timings: Mapping[str, Any] | None, done: str = "Done") -> str:
    """The timings report as one line: "Done in 4.2 s: faces 31 ms · prompt 12 ms · denoising 3.8 s · …"."""
    if not timings:
        return ""
    known = [key for key in STAGES if key in timings] + [k for k in timings if k not in STAGES and k != "total_ms"]
    known = [k for k in known if isinstance(timings[k], (int, float))]  # the API's "warnings" list rides along
    parts = [f"{STAGES.get(k, k.removesuffix('_ms').replace('_', ' '))} {_duration(float(timings[k]))}" for k in known]
    total = timings.get("total_ms")
    head = f"{done} in {_duration(float(total))}" if isinstance(total, (int, float)) else done
    return f"{head}: {' · '.join(parts)}" if parts else head


# A cached example's line: it is shown again, from the cache, in far less time than it took the first time.
EXAMPLE_DONE = "Example shown from the cache; first generated"

# The progress line, from the info output of a run's intermediate outputs ({"progress": {...}}, `Partial`); empty
# for anything else (the final timings, a cleared result). Gradio's own overlay is hidden for runs: each
# intermediate output reset its timer to 0 and took its bar away, so it flickered through a whole run.
RUN_PROGRESS_JS = """(info) => {
    const p = info && info.progress;
    if (!p) return "";
    const secs = Number(p.elapsed_s || 0).toFixed(1);
    const steps = Number(p.steps || 0), step = Number(p.step || 0);
    const stage = String(p.stage || "working").replace(/[^a-z ]/gi, "");
    const what = steps ? `Step ${step} of ${steps}` + (stage === "denoising" ? "" : ` (${stage})`)
                       : stage.charAt(0).toUpperCase() + stage.slice(1);
    const bar = steps ? `<progress max="${steps}" value="${step}"></progress>` : "<progress></progress>";
    const text = `<span class="run-progress-text">${what} · ${secs} s</span>`;
    return `<div class="run-progress" role="status">${bar} ${text}</div>`;
}"""


def visible_in(mode: str, modes: Sequence[str]) -> dict[str, bool]:
    """Which mode-dependent controls the page shows in `mode`: that mode's own parameters (of those the
    offered modes do not all share), its button, the ControlNet choices where it takes them, the before/after."""
    own = [p for p in offered_params(modes).values() if set(modes) - set(p.modes)]
    # The `controlnets` mapping itself is a hidden input: its page face is the boxes and sliders ("controls").
    # Framing and head angle show and hide as one block ("composition", with their layout preview).
    shown = {BOXED.get(p.name, p.name): mode in p.modes for p in own if p.label and p.kind != "controls"}
    shown.update({f"{m}_btn": m == mode for m in modes})
    shown.update({f"{m}_estimate": m == mode for m in modes})
    shown.update({f"{m}_note": m == mode for m in modes if m in MODE_NOTES})
    shown["controls"] = mode in PARAMS["controlnets"].modes
    shown["before_after"] = MODE_SPECS[mode].before_after
    shown.update({f"{m}_examples": m == mode for m in modes})
    return shown


def before_after(target: str | None, gallery: Sequence[Any] | None) -> tuple[str, str] | None:
    """A mode's before/after (`Mode.before_after`, Face swap's): its own photo and the first result (a gallery
    item is (path, caption))."""
    if not target or not gallery:
        return None
    first = gallery[0]
    image = first[0] if isinstance(first, (list, tuple)) else first.get("image", first)
    return target, image if isinstance(image, str) else getattr(image, "path", image)


# --- the app -----------------------------------------------------------------------------------------


TINY_BANNER = "**Tiny preset: random tiny weights, so the images are noise.**"
# The rest of the tiny preset's note, under "About" (a phone's first screen is for the inputs).
TINY_ABOUT = (
    "**Tiny preset:** every code path runs, offline, but nothing here was trained. For the real models unset "
    "`INSTANTID_PRESET` (with network access, or with the checkpoints already in the Hugging Face cache and "
    "`HF_HUB_OFFLINE=1`)."
)


# What the page adds to a parameter's declared control (placeholders, sizes, element ids for the browser test).
PAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "face_image": {"height": 360, "elem_id": "face-image"},
    "source_image": {"elem_id": "source-image"},
    "target_image": {"elem_id": "target-image"},
    "layout_image": {"elem_id": "layout-image"},
    "pose_image": {"elem_id": "pose-image"},
    "num_images": {"elem_id": "num-images"},
    "prompt": {"placeholder": "e.g. a woman as an astronaut on Mars, cinematic light", "lines": 2, "elem_id": "prompt",
               "info": "Shift+Enter runs it; Enter starts a new line"},
    "negative_prompt": {"placeholder": "what to avoid (optional)"},
    "seed": {"elem_id": "seed"},
    "speed": {"elem_id": "speed"},
}


PHOTO_SOURCES = ["upload", "webcam", "clipboard"]
# Presses the first of the buttons (element ids) that is shown; a hidden one has no offsetParent.
PRESS_SHOWN_BUTTON_JS = """() => {
    const shown = BUTTONS.map((id) => document.getElementById(id)).find((b) => b && b.offsetParent !== null);
    if (shown) shown.click();
}"""


def make_control(p: Param, settings: Settings, *, visible: bool = True, facts: PageFacts | None = None) -> Any:
    """The page's control for a declared parameter; one with no label is an API-only hidden input, and one
    of another mode than the page's first starts hidden (`mode_visibility` shows it). `facts`: this server's
    hints and limits (the declaration's without)."""
    facts = facts or PageFacts.from_report({})
    options = {"label": p.label or p.name, "visible": bool(p.label) and visible, **({"info": p.info} if p.info else {}),
               **PAGE_OPTIONS.get(p.name, {}), **facts.options().get(p.name, {})}
    if p.kind == "image":
        # image_mode=None: the file is handed over untouched, `instantid.vision.images` decodes it.
        return gr.Image(type="filepath", image_mode=None, sources=PHOTO_SOURCES, **{"height": 240, **options})
    if p.kind == "images":
        return gr.File(file_count="multiple", file_types=["image"], type="filepath", **options)
    if p.kind == "text":
        return gr.Textbox(value=None if p.required else p.default, **{"lines": 1, **options})
    if p.kind == "choice" and len(p.choices) <= 4:  # a few choices (the speed): all in view, one click
        return gr.Radio(choices=list(p.choices), value=p.default, **options)
    if p.kind == "choice":
        return gr.Dropdown(choices=list(p.choices), value=p.default, **options)
    if p.kind == "boolean":
        return gr.Checkbox(value=p.default, **options)
    if p.kind == "controls":
        return gr.JSON(value=p.default, visible=False, label=p.name)  # the page fills it in `start_run`
    hi = min(p.hi, settings.max_output_side // 64 * 64) if p.step == 64 else p.hi
    if p.name == "num_images":  # the slider stops where the server's profile does
        hi = min(hi, facts.max_images)
    # A seed (a slider would be useless), and degrees that may stay unset: a Slider shows and sends its minimum for
    # None, so a hidden one made every page run ask for -45 degrees (head_yaw, head_pitch).
    if (hi - p.lo) / (p.step or 1) > 1000 or p.default is None:
        whole = p.kind == "integer"  # Number's own step (1) would read as "an integer" in a refusal
        return gr.Number(value=p.default, precision=0 if whole else None, step=1 if whole else 0.1, minimum=p.lo,
                         maximum=hi, **options)
    return gr.Slider(minimum=p.lo, maximum=hi, step=p.step, value=p.default, **options)


def _controlnet_inputs(p: Param, mode: str) -> tuple[Any, list[Any]]:
    """The page's face of the `controlnets` mapping: a box per type and a strength slider each."""
    chosen = gr.CheckboxGroup(label=MODE_SPECS[mode].controls_label or p.label, choices=list(CONTROL_TYPES), value=[])
    with gr.Row():
        strengths = [
            gr.Slider(label=f"{c.label} strength", minimum=0, maximum=MAX_STRENGTH, step=0.05,
                      value=DEFAULT_CONTROLNET_STRENGTH)
            for c in CONTROL_TYPES.values()
        ]
    return chosen, strengths


def offered_params(modes: Sequence[str]) -> dict[str, Param]:
    """Every parameter of the offered modes, each once, in the API's order (one control serves all its modes)."""
    return {name: p for name, p in PARAMS.items() if any(mode in p.modes for mode in modes)}


def _photos_preview(p: Param) -> Any:
    """Thumbnails of the photos a file list holds (`preview_photos` fills it): the list itself shows only file
    names. Page-only: the list stays the input, so the API's type and the examples are the file list's."""
    return gr.Gallery(label=f"{p.label}: preview", show_label=False, columns=4, fit_columns=False, height=110,
                      object_fit="cover",
                      allow_preview=False, interactive=False, visible=False, container=False,
                      elem_id=f"{p.name.replace('_', '-')}-preview", elem_classes=["photo-previews"])


def preview_photos(files: Sequence[Any] | None) -> Any:
    """The thumbnails of a file list's photos; hidden while it holds none."""
    paths = [str(getattr(f, "path", f)) for f in files or []]
    return gr.update(value=paths or None, visible=bool(paths))


def _mode_control(c: dict[str, Any], p: Param, settings: Settings, modes: Sequence[str],
                  facts: PageFacts | None = None) -> Any:
    """`make_control`; one that only some of the offered modes take sits in a column of its own (`<name>_box`),
    which the mode choice shows and hides. Never the input itself: Gradio answers an update of a component
    (visibility too) with a new instance of it for that session, without `guard_input`'s checks (a face index
    of 150 got Gradio's own "Value 150 is greater than maximum value 99." after a mode switch, and a photo
    would be decoded by Gradio before `instantid.vision.images` checks it)."""
    if not p.label or not set(modes) - set(p.modes) or p.kind == "controls":
        control = make_control(p, settings, visible=modes[0] in p.modes, facts=facts)
        if p.kind == "images" and p.label:
            c[f"{p.name}_preview"] = _photos_preview(p)
        return control
    with gr.Column(visible=modes[0] in p.modes, min_width=0) as c[f"{p.name}_box"]:
        control = make_control(p, settings, facts=facts)
        if p.kind == "images":
            c[f"{p.name}_preview"] = _photos_preview(p)
        return control


# Framing and head angle: one block on the page (`composition_box`), with the preview of the face layout they
# draw (`hints.wire_layout_preview`), shown and hidden with the modes that take them.
COMPOSITION = ("framing", "head_angle")
BOXED = dict.fromkeys(COMPOSITION, "composition")
LAYOUT_PREVIEW_HEIGHT = 240  # the tallest preview, full body's 160 x 234


def _composition(c: dict[str, Any], params: Mapping[str, Param], settings: Settings, modes: Sequence[str],
                 facts: PageFacts | None) -> None:
    """The framing and head-angle controls (of the offered modes that take them) in one block, and the layout
    preview under them: hidden until a framing or head angle places the face (`hints.layout_preview`)."""
    offered = [params[name] for name in COMPOSITION if name in params]
    shown = modes[0] in offered[0].modes
    with gr.Column(visible=shown, min_width=0, elem_id="composition") as c["composition_box"], gr.Group():
        for p in offered:
            c[p.name] = make_control(p, settings, facts=facts)
        # Beside its caption where there is room, above it on a phone (the row wraps under two minimum widths).
        with gr.Row(visible=False, equal_height=False, elem_id="layout-preview") as c["layout_preview_box"]:
            c["layout_preview"] = gr.Image(
                label="Face layout preview", type="pil", format="png", interactive=False, buttons=[],
                height=LAYOUT_PREVIEW_HEIGHT, width=framing.PREVIEW_WIDTH, show_label=False, container=False,
                scale=0, min_width=framing.PREVIEW_WIDTH, elem_id="layout-preview-image",
            )
            c["layout_preview_caption"] = gr.Markdown(min_width=160, elem_id="layout-preview-caption")


def _generate_tab(settings: Settings, modes: Sequence[str], facts: PageFacts | None = None) -> dict[str, Any]:
    """The Create tab's components by name: every parameter's input, the page-only controls, the outputs."""
    c: dict[str, Any] = {}
    params = offered_params(modes)
    sections = {name: [p for p in params.values() if p.section == name] for name in ("main", "photos", "advanced")}
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            c["mode"] = gr.Radio([MODE_SPECS[m].label for m in modes], value=MODE_SPECS[modes[0]].label, label="Mode",
                                 visible=len(modes) > 1, elem_id="mode")
            for p in sections["main"]:
                if p.name in BOXED:
                    if p.name == COMPOSITION[0]:
                        _composition(c, params, settings, modes, facts)
                    continue
                c[p.name] = _mode_control(c, p, settings, modes, facts)
            for mode in modes:
                c[f"{mode}_btn"] = gr.Button(MODE_SPECS[mode].button, variant="primary", visible=mode == modes[0],
                                             elem_id=f"{mode}-button")
                # What the settings shown will cost (`estimate_fn`, wired in hints.py's `wire_estimates`); the mode
                # choice shows and hides its column, as it does the other modes' own inputs.
                with gr.Column(visible=mode == modes[0], min_width=0) as c[f"{mode}_estimate_box"]:
                    c[f"{mode}_estimate"] = gr.Markdown(elem_id=f"{mode}-estimate")
                if mode in MODE_NOTES:
                    c[f"{mode}_note"] = gr.Markdown(MODE_NOTES[mode], visible=mode == modes[0],
                                                    elem_id=f"{mode}-note")
            with gr.Accordion(MODE_SPECS[modes[0]].photos_label, open=False) as c["photos"]:
                for p in sections["photos"]:
                    c[p.name] = _mode_control(c, p, settings, modes, facts)
            with gr.Accordion("Advanced settings", open=False):
                for p in sections["advanced"]:
                    if p.kind == "controls":
                        c["chosen_controls"], c["control_strengths"] = _controlnet_inputs(p, modes[0])
                    c[p.name] = _mode_control(c, p, settings, modes, facts)
                    if p.name == "seed":
                        # The page draws its random seed in `start_run`, so it shows before the result; the
                        # API's randomize_seed input (hidden) stays off for the page.
                        c["randomize"] = gr.Checkbox(label="Randomize seed", value=True)
        with gr.Column(scale=1):
            # The run's progress line (step i of n, seconds since the start), drawn in the page from the run's
            # intermediate outputs (`RUN_PROGRESS_JS`); the gallery shows the live preview meanwhile.
            c["progress"] = gr.HTML(elem_id="run-progress")
            c["gallery"] = gr.Gallery(
                label="Results", format="png", columns=2, object_fit="contain",
                buttons=["download", "fullscreen"], interactive=False, elem_id="gallery",
            )
            # Face swap's before/after, filled by a page-only step from the target photo and the first result.
            c["before_after"] = gr.ImageSlider(label="Before / after", type="filepath", interactive=False,
                                               visible=False, elem_id="before-after")
            # The API returns the similarities and timings as data; the page shows them in the captions and
            # in one readable line (`timings_line`).
            c["summary"] = gr.Markdown(elem_id="run-summary")
            c["similarities"] = gr.JSON(label="Identity similarity", visible=False)
            c["timings"] = gr.JSON(label="Timings (ms)", visible=False)
            c["keypoints"] = gr.Image(label="Face keypoints", type="pil", format="png", interactive=False, height=240)
            # The seed used, for the API; the page shows it in the seed box already (`start_run`). Not the seed
            # box itself: Gradio rebuilds an output per session when the generator yields gr.skip() for it, and
            # an input rebuilt that way would lose its checks (`guard_input`).
            c["seed_used"] = gr.Number(label="Seed", precision=0, visible=False)
    return c


def build_demo(
    fns: Mapping[str, Callable[..., Any]],
    status_fn: Callable[[], Mapping[str, Any]],
    *,
    settings: Settings,
    examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    sample_memory: bool = False,
    estimate_fn: Callable[[str, Mapping[str, Any]], str] | None = None,
) -> gr.Blocks:
    """Build the Blocks app.

    fns: per mode (`instantid.declaration.MODES`), its function, e.g. {"generate": api.generate,
      "swap": api.swap}
      (`instantid.frontends.api.ENDPOINTS` holds every mode's). Each takes the inputs
      `instantid.declaration.params_for(mode)` declares (same order, same names, plus an optional
      `progress=gr.Progress()`), yields `Partial` outputs (or `gr.skip()`) while it works and then (gallery,
      seed, similarities, keypoint image, timings); raises gr.Error for user-facing problems.
      A mode without its function is not offered (nor its endpoint); the first offered is shown first.
    status_fn: returns the engine's JSON-ready report. Called once here as well: its memory profile sets the
      page's hints and limits (`PageFacts`: the steps each speed runs, the most images a request makes).
    examples: per mode, rows of that mode's inputs by parameter name (every row of a mode names the same
      ones; the rest keep their defaults), e.g. {"swap": [{"face_image": path, "target_image": path,
      "face_index": 1, "prompt": text}]}. Each mode's examples show with that mode only.
    sample_memory: sample status_fn's memory figures every STATUS_REFRESH_S in a daemon thread from now on,
      so the Status tab's chart holds the server's history whenever it is opened (the app does; tests that
      only build a demo need no thread). Without it the chart grows only while someone has the tab open.
    estimate_fn: (mode, {parameter name: value shown}) -> a Markdown line shown beside the mode's run button and
      redrawn as the settings change (`instantid.frontends.api.estimate`: the GPU seconds the run will ask; wired
      in hints.py); cheap, no torch.
    """
    if unknown := sorted(set(fns) - set(MODES)):
        raise ValueError(f"build_demo: no mode {unknown[0]!r}; the modes are {', '.join(MODES)}")
    modes = [mode for mode in MODES if mode in fns]
    if not modes:
        raise ValueError("build_demo: give the function of one mode at least, e.g. {'generate': api.generate}")
    with gr.Blocks(title="InstantID", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}", elem_id="intro")
        if settings.preset == "tiny":
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        with gr.Accordion("About: the modes, the API", open=False, elem_id="about"):
            gr.Markdown(ABOUT + (f"\n{TINY_ABOUT}" if settings.preset == "tiny" else ""))
        facts = PageFacts.from_report(safe_report(status_fn))
        with gr.Tabs():
            # Named for what it holds (the four modes), not after one of them.
            with gr.Tab("Create", id="create") as generate_tab:
                c = _generate_tab(settings, modes, facts)
                outputs = [c["gallery"], c["seed_used"], c["similarities"], c["keypoints"], c["timings"]]
                for mode in modes:
                    # A column per mode even without examples: the mode choice shows and hides it by name.
                    with gr.Column(visible=mode == modes[0], elem_classes=["mode-examples"]) as c[f"{mode}_examples"]:
                        if examples and examples.get(mode):
                            _examples(mode, fns[mode], examples[mode], c, outputs)
            with gr.Tab("Status", id="status", elem_id="status-tab") as status_tab:
                s = build_tab()
        _wire_generate(demo, {mode: fns[mode] for mode in modes}, c, outputs)
        if estimate_fn is not None:
            wire_estimates(demo, estimate_fn, modes, c)
        if "composition_box" in c:
            wire_layout_preview(demo, modes, c, working_short_side(settings, facts), settings.max_output_side)
        history = wire_status(status_fn, s, status_tab, generate_tab)
    if sample_memory:
        history.start(status_fn)
    return demo


def _examples(
    mode: str, fn: Callable[..., Any], rows: Sequence[Mapping[str, Any]], c: dict[str, Any], outputs: list[Any]
) -> None:
    names = list(rows[0])
    if unknown := [n for n in names if n not in params_for(mode)]:
        raise ValueError(f"{mode} examples name {unknown}: not parameters of {mode}")
    if any(list(row) != names for row in rows):
        raise ValueError(f"every {mode} example must name the same inputs, in the same order: {names}")
    # Shown like a run from the button: the summary line, and for a swap the before/after view.
    spec = MODE_SPECS[mode]
    shown = [*outputs, c["summary"], *([c["before_after"]] if spec.before_after else [])]

    # Each example is generated on its first click, in the queue like a run from the button (so with its step
    # progress), then served from memory. Gradio's lazy example cache ran that first generation outside the
    # event (gradio/helpers.py: Examples.cache calls process_api without an event id), so gr.Progress had no
    # event to report to and the first click showed no progress. Keyed by the example's number: nothing a
    # client sends can grow it.
    cached: dict[int, list[Any]] = {}
    locks = [threading.Lock() for _ in rows]

    def run_example(chosen: tuple[int, Any]) -> Any:
        index = chosen[0]
        given = dict(rows[index])
        with locks[index]:  # two first clicks at once: one generation, the other is served its result
            if index not in cached:
                for item in fn(**given):
                    if isinstance(item, Partial):  # progress and previews while it works
                        yield [*item, gr.skip(), *([gr.skip()] if spec.before_after else [])]
                        continue
                    if not isinstance(item, (tuple, list)):  # gr.skip()
                        yield item
                        continue
                    line = timings_line(item[4])
                    extra = [before_after(given[spec.photo], item[0])] if spec.before_after else []
                    cached[index] = [*item, timings_line(item[4], done=EXAMPLE_DONE), *extra]
                    yield [*item, line, *extra]
                return
        # Shown again on every later click: the line says when it was made, not "Done in".
        yield cached[index]

    examples = gr.Examples(
        examples=[list(row.values()) for row in rows],
        inputs=[c[name] for name in names],
        label=f"{spec.label} examples (click one: generated once, then shown again at once)",
    )
    if any(PARAMS[name].section == "photos" for name in names):
        # An example that sets a photo kept in the closed accordion (Group's layout photo) opens it: set unseen,
        # nobody could tell the example used it. Before the run's listener: the page runs a click's listeners in
        # turn, each to its end.
        examples.dataset.click(lambda: gr.Accordion(open=True), None, c["photos"], queue=False,
                               api_visibility="private", show_progress="hidden")
    examples.dataset.click(run_example, [examples.dataset], shown, api_visibility="private", show_progress="hidden")


def _wire_generate(
    demo: gr.Blocks, fns: Mapping[str, Callable[..., Any]], c: dict[str, Any], outputs: list[Any]
) -> None:
    modes = list(fns)
    for name, param in offered_params(modes).items():
        guard_input(c[name], param)
    # A number typed out of a slider's range is sent as typed, so that it is refused with its sentence.
    demo.load(None, None, None, js=KEEP_TYPED_NUMBERS_JS)
    quiet: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    # `input`, not `change`: only a visitor's own choice resets them (a `change` also fires when a value is
    # set without the visitor). A typed Steps once back at 0 by the click was first blamed on such a `change`;
    # the cause found later is Gradio's first drawing of the closed accordion (KEEP_TYPED_NUMBERS_JS).
    for choice in ("speed", "enable_lcm"):
        c[choice].input(automatic_steps, [c[choice]], [c["num_steps"], c["guidance_scale"]], **quiet)
    for name in offered_params(modes):
        if f"{name}_preview" in c:
            c[name].change(preview_photos, [c[name]], [c[f"{name}_preview"]], **quiet)
    if len(modes) > 1:
        _wire_mode_choice(c, modes, quiet)
    # While a run is in flight its controls (the mode buttons, the mode choice) are off: a click then started
    # nothing, yet drew a new seed into the Seed box. Back on after the run's success or error.
    run_controls = [*(c[f"{mode}_btn"] for mode in modes), c["mode"]]

    def begin_run(*values: Any) -> tuple[Any, ...]:
        return (*start_run(*values), *[gr.update(interactive=False)] * len(run_controls))

    def end_run() -> list[Any]:
        return [gr.update(interactive=True)] * len(run_controls)

    cleared = [c["seed"], c["controlnets"], c["gallery"], c["similarities"], c["keypoints"], c["timings"],
               c["before_after"], c["summary"], *run_controls]
    start = [c["seed"], c["randomize"], c["chosen_controls"], *c["control_strengths"]]
    for mode, fn in fns.items():
        # The page's own refusals first, worded with its labels ("Steps must be ..."); the API's (the event
        # after it, which gradio_client and MCP call too) keep the parameter names. Inputs as sent
        # (preprocess=False): a component's own check (`guard_input`) would answer first, in the API's words.
        names = list(params_for(mode))
        check = c[f"{mode}_btn"].click(
            page_check(mode, _page_ranges(c, names)), [*start, *(c[name] for name in names)], None,
            preprocess=False, queue=True, concurrency_limit=None, api_visibility="private", show_progress="hidden",
        )
        event = check.success(
            begin_run, start,
            cleared,
            # Queued, as only a queued event's error reaches the page (a seed of -5 used to fail silently),
            # but with no concurrency limit: it never waits behind a running generation.
            queue=True, concurrency_limit=None, api_visibility="private", show_progress="hidden",
        ).success(fn, [c[name] for name in params_for(mode)], outputs, api_name=mode, show_progress="hidden")
        # On success and on failure: after a failed run the page ran no `.then` step (Gradio 6.31's frontend
        # dispatches only the `.failure` steps of a queued event that failed). A refused start never switched
        # them off.
        event.success(end_run, None, run_controls, **quiet)
        event.failure(end_run, None, run_controls, **quiet)
        # The last step shown is not left behind; in the page alone (a server step drew Gradio's timer over it).
        event.failure(None, None, [c["progress"]], js="() => ''", **quiet)
        event.success(timings_line, [c["timings"]], [c["summary"]], **quiet)
        if MODE_SPECS[mode].before_after:
            event.success(before_after, [c[MODE_SPECS[mode].photo], c["gallery"]], [c["before_after"]], **quiet)
    # Drawn in the page (no server call) from every value the info output takes: the run's progress, then "".
    c["timings"].change(None, [c["timings"]], [c["progress"]], js=RUN_PROGRESS_JS, **quiet)
    # The prompt box has two lines, so Gradio submits it on Shift+Enter (Enter starts a new line). It runs
    # the mode shown by pressing that mode's button in the page: one path, the button's, for every run.
    buttons = json.dumps([f"{mode}-button" for mode in modes])
    c["prompt"].submit(None, None, None, js=PRESS_SHOWN_BUTTON_JS.replace("BUTTONS", buttons), **quiet)


def _page_ranges(c: Mapping[str, Any], names: Sequence[str]) -> dict[str, tuple[float, float]]:
    """The page's own range of each number input (a server may allow less than the declaration: its largest
    side, its profile's image count)."""
    ranges = {}
    for name in names:
        lo, hi = getattr(c[name], "minimum", None), getattr(c[name], "maximum", None)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            ranges[name] = (lo, hi)
    return ranges


def page_check(mode: str, ranges: Mapping[str, tuple[float, float]]) -> Callable[..., None]:
    """The page's check of a run of `mode` before it starts: the values as the page sends them (the seed box,
    the Randomize box, the ticked ControlNets and their strengths, then `params_for(mode)`'s inputs) checked
    as the API will check them (`Param.check` within the page's `ranges`, then `Request`), refused in the
    page's words: each field named by its label (`labelled_sentence`), no "(API: ...)" pointer."""
    names = list(params_for(mode))

    def check_run(seed: Any, _randomize: Any, chosen: list[str] | None, *values: Any) -> None:
        strengths, given = values[: len(CONTROL_TYPES)], dict(zip(names, values[len(CONTROL_TYPES):], strict=True))
        given["seed"] = seed
        if "controlnets" in given:
            given["controlnets"] = start_run(None, True, chosen, *strengths)[1]
        try:
            for name, value in given.items():
                if name in ranges and value is not None:
                    replace(PARAMS[name], lo=ranges[name][0], hi=ranges[name][1]).check(value)
            Request.from_api(given, mode)
        except InvalidParameter as exc:
            raise gr.Error(labelled_sentence(exc), print_exception=False) from None
        except UserError as exc:
            raise gr.Error(re.sub(r" \(API: [^)]*\)", "", str(exc)), print_exception=False) from None

    return check_run


def _wire_mode_choice(c: dict[str, Any], modes: list[str], quiet: dict[str, Any]) -> None:
    """The mode choice shows only that mode's inputs, with labels that name that mode's photos, and clears the
    last mode's results (they are not this mode's); a cheap step outside the queue."""
    names = list(visible_in(modes[0], modes))
    targets = [c[f"{n}_box"] if f"{n}_box" in c else c[n] for n in names if n != "controls"]
    if "controls" in names:
        targets += [c["chosen_controls"], *c["control_strengths"]]
    shown_targets = len(targets)
    results = [c["gallery"], c["seed_used"], c["similarities"], c["keypoints"], c["timings"], c["summary"]]
    targets += [c["photos"], *results]
    by_label = {MODE_SPECS[m].label: m for m in modes}

    def show_mode(label: str) -> list[Any]:
        mode = by_label.get(label, modes[0])
        shown = visible_in(mode, modes)
        updates = [gr.update(visible=shown[n], **({"value": None} if n == "before_after" else {}))
                   for n in names if n != "controls"]
        if "controls" in names:
            relabel = {"label": MODE_SPECS[mode].controls_label} if MODE_SPECS[mode].controls_label else {}
            updates.append(gr.update(visible=shown["controls"], **relabel))
        updates += [gr.update(visible=shown["controls"])] * (shown_targets - len(updates))
        return [*updates, gr.update(label=MODE_SPECS[mode].photos_label), None, None, None, None, None, ""]

    c["mode"].change(show_mode, [c["mode"]], targets, **quiet)
