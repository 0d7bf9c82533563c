"""What the Create tab tells before a run, true for this server: the hints and limits its memory profile sets
(`PageFacts`: the steps each speed runs, the most images a request makes), a mode's note under its button
(`MODE_NOTES`), and the cost estimate beside each button, redrawn as the settings change (`wire_estimates`).
No torch: the facts come from the status report, the estimate from the function the app hands over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..declaration import DEFAULT_SPEED, MAX_IMAGES, SPEED_CHOICES, SPEEDS, params_for
from ..models.memory import PROFILES


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
