"""What the Create tab tells before a run, true for this server: the hints and limits its memory profile sets
(`PageFacts`: the steps each speed runs, the most images a request makes), a mode's note under its button
(`MODE_NOTES`), the cost estimate beside each button, redrawn as the settings change (`wire_estimates`), and the
face layout a framing or head angle will draw, on a model face (`wire_layout_preview`).
No torch: the facts come from the status report, the estimate from the function the app hands over, the layout
from `instantid.vision.framing` (numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..declaration import DEFAULT_SPEED, MAX_IMAGES, MAX_PEOPLE, MODE_SPECS, PARAMS, SPEED_CHOICES, SPEEDS, params_for
from ..models.memory import PROFILES
from ..request import scenes
from ..settings import Settings
from ..vision import framing


@dataclass(frozen=True)
class PageFacts:
    """What the page's hints and limits say about this server, read once at build from its status report (its
    memory profile): the steps each speed runs here when Steps is 0 (the cpu profile runs 20 quality steps, not
    the declaration's 30) and the most images one request makes (the profile's; the API clamps with a warning).
    With no profile in the report (a status that failed), the declaration's own figures."""

    profile: str
    steps: Mapping[str, int]  # a SPEEDS name -> its automatic steps here
    max_images: int

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> PageFacts:
        name = str((report.get("profile") or {}).get("name") or "")
        profile = PROFILES.get(name)
        if profile is None:
            return cls("", {s.name: s.steps for s in SPEEDS.values()}, MAX_IMAGES)
        # As the engine picks them: the profile's default steps apply to the base weights' speed only.
        steps = {s.name: (s.lora is None and profile.default_steps) or s.steps for s in SPEEDS.values()}
        return cls(name, steps, min(profile.max_images, MAX_IMAGES))

    def passes(self, speed: str) -> int:
        """UNet passes per image: a guided step runs two (the conditional and the unconditional one)."""
        return self.steps[speed] * (2 if SPEEDS[speed].guidance > 1 else 1)

    def speed_info(self) -> str:
        """The speed choice's hint: each speed's steps here and its share of quality's denoising time."""
        parts = []
        for name in SPEED_CHOICES:
            text = f"{name}: {self.steps[name]} steps"
            if name != DEFAULT_SPEED:
                text += f", ~{100 * self.passes(name) / self.passes(DEFAULT_SPEED):.0f} % of the time"
            if SPEEDS[name].guidance <= 1:
                text += ", no negative prompt"
            parts.append(text)
        return "; ".join(parts)

    def steps_info(self) -> str:
        where = f" with the {self.profile} profile" if self.profile else ""
        return "0 = automatic (" + ", ".join(f"{n} {s}" for s, n in self.steps.items()) + f"{where})"

    def options(self) -> dict[str, dict[str, Any]]:
        """The page's options for the controls these facts concern (besides PAGE_OPTIONS)."""
        return {"speed": {"info": self.speed_info()}, "num_steps": {"info": self.steps_info()}}


# A mode's note under its button, shown with it. Group's cost: each person has their own UNet pass at every
# step (BENCHMARKS.md, group locality), and refine_faces (on for Group) renders each small face once more.
MODE_NOTES = {
    "group": "A group portrait costs about **one Generate per person** per image (each person has their own pass "
             "at every step), plus one more render per small face it refines.",
}

# The parameters an estimate reads (`instantid.frontends.api.estimate`), where the mode takes them.
ESTIMATE_PARAMS = ("person_1", "person_2", "person_3", "person_4", "layout_image", "num_images", "width", "height",
                   "strength", "num_steps", "guidance_scale", "speed", "enable_lcm", "refine_faces",
                   "framing", "pose_image")


def wire_estimates(
    demo: gr.Blocks, estimate_fn: Callable[[str, Mapping[str, Any]], str], modes: Sequence[str], c: dict[str, Any]
) -> None:
    """Each mode's estimate, redrawn outside the queue whenever one of its settings changes, and at page load
    (the figures it prices from may have changed since the page was built). The values as sent, unconverted
    (`preprocess=False`): a value being typed out of range is priced as it stands rather than refused in a toast
    by `guard_input` before the visitor presses the button; a photo is only there or not."""
    quiet: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden",
                             "preprocess": False}
    for mode in modes:
        names = [n for n in ESTIMATE_PARAMS if n in params_for(mode)]
        inputs = [c[n] for n in names]
        if "controlnets" in params_for(mode):
            names.append("controlnets")
            inputs.append(c["chosen_controls"])

        def show(*values: Any, mode: str = mode, names: list[str] = names) -> str:
            return estimate_fn(mode, dict(zip(names, values, strict=True)))

        target = c[f"{mode}_estimate"]
        demo.load(show, inputs, target, **quiet)
        for component in inputs:
            component.change(show, inputs, target, **quiet)


# --- the face layout preview ---------------------------------------------------------------------------------------
# The parameters the preview reads, where the mode takes them: what it draws (framing, head angle, the size), what
# hides it (a pose or layout photo sets the layout instead), and how many people a group places side by side.
LAYOUT_PARAMS = ("framing", "head_angle", "width", "height", "pose_image", "layout_image",
                 *(f"person_{k}" for k in range(1, MAX_PEOPLE + 1)))


def working_short_side(settings: Settings, facts: PageFacts) -> int:
    """The working size's short side a run on this server uses (as `Workshop.working_short_side` picks it): the
    tiny preset's, else the profile's (1024, SDXL's, where the status report named none)."""
    return scenes.working_short_side(settings.preset, PROFILES.get(facts.profile))


def people_on_page(mode: str, values: Mapping[str, Any]) -> int:
    """The people a page's `values` (by parameter name) place: in a mode with people, the slots up to the last one
    filled, two at least (what a group needs, before any photo is given); 0 in a mode without."""
    if not MODE_SPECS[mode].people:
        return 0
    return max([2, *(k for k in range(1, MAX_PEOPLE + 1) if values.get(f"person_{k}"))])


def _side(value: Any) -> int:
    """A width or height as the page sends it (a number, text being typed, nothing): 0 unless a positive number."""
    try:
        return max(0, int(float(value)))
    except (TypeError, ValueError):
        return 0


def layout_preview(mode: str, values: Mapping[str, Any], short_side: int, max_side: int) -> tuple[Any, Any, str]:
    """What the page shows under the framing and head angle (`values` by parameter name, as the page sends them):
    (the preview's visibility, the keypoint drawing of a model face as the run will place and turn it, its caption).
    Hidden for the face photo's own layout (framing and head angle photo), where a pose or layout photo sets it, and
    in a mode that takes neither."""
    hidden = gr.update(visible=False), None, ""
    name, angle = str(values.get("framing") or "photo"), str(values.get("head_angle") or "photo")
    takes = params_for(mode)
    layout_photo = any(values.get(p) for p in ("pose_image", "layout_image") if p in takes)
    known = name in framing.FRAMINGS and angle in framing.HEAD_ANGLES
    if "framing" not in takes or (name, angle) == ("photo", "photo") or layout_photo or not known:
        return hidden
    # The canvas as the scenes take it (`framing.planned_canvas`); for framing photo the face photo's own size
    # decides, unknown here: a square stands in for it.
    people = people_on_page(mode, values) or 1
    width, height = (min(_side(values.get(side)), max_side) for side in ("width", "height"))
    asked = (width, height) if width >= 64 and height >= 64 else None
    width, height = framing.planned_canvas(name, people, asked, short_side, max_side) or (short_side, short_side)
    image = framing.model_layout(name, angle, (width, height), people)
    what = ", ".join([*([name] if name != "photo" else []), *([f"head angle {angle}"] if angle != "photo" else []),
                      *([f"{people} people"] if people > 1 else []), f"{width}x{height}"])
    whose = "each person's" if people > 1 else "your photo's"
    caption = (f"Face layout of this run ({what}), shown on a model face: {whose} own face proportions replace the "
               "model face's.")
    if name == "photo" and people == 1:
        caption += " The face keeps the place and size it has in your photo."
    return gr.update(visible=True), image, caption


def wire_layout_preview(demo: gr.Blocks, modes: Sequence[str], c: dict[str, Any], short_side: int,
                        max_side: int) -> None:
    """Redraw the layout preview (`layout_preview`) outside the queue whenever the mode or one of the values it
    reads changes; the values as sent (`preprocess=False`), as for the estimate: a photo is only there or not."""
    quiet: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden",
                             "preprocess": False}
    names = [n for n in LAYOUT_PARAMS if n in c and any(m in PARAMS[n].modes for m in modes)]
    inputs = [c["mode"], *(c[n] for n in names)]
    by_label = {MODE_SPECS[m].label: m for m in modes}

    def show_layout(label: str, *values: Any) -> tuple[Any, Any, str]:
        try:
            return layout_preview(by_label.get(label, modes[0]), dict(zip(names, values, strict=True)), short_side,
                                  max_side)
        except Exception:  # a half-filled page must never raise in the visitor's face: no preview then
            return gr.update(visible=False), None, ""

    outputs = [c["layout_preview_box"], c["layout_preview"], c["layout_preview_caption"]]
    for component in inputs:
        component.change(show_layout, inputs, outputs, **quiet)
