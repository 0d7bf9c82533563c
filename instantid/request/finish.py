"""The CPU stage after the GPU: a swap's faces pasted back, each image's identity scored (people matched to
the faces found, in a group), warnings and timings gathered into the `Result`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..vision import geometry
from ..vision.faces import FaceAnalyzer, PersonMatch, identity_similarity, match_people_detail
from ..vision.images import image_to_array, release_memory
from .requests import Job, Rendered, Result


def finish(job: Job, rendered: Rendered, faces: Callable[[], FaceAnalyzer], profile: str) -> Result:
    """The request's result: identity similarity of each image, warnings, timings. `faces()` is the face
    analyzer; `profile` the name of the memory profile the images were made with."""
    try:
        return _finish(job, rendered, faces, profile)
    finally:
        # The render's activations (GBs at 1280x1280 on the CPU) were freed in the threads that ran it, and
        # glibc keeps a thread's freed memory in that thread's arena: measured, a 4-person 1280x1280 group
        # on the cpu profile left the process 623 MB bigger until the next request's trim.
        release_memory()


def _finish(job: Job, rendered: Rendered, faces: Callable[[], FaceAnalyzer], profile: str) -> Result:
    t0 = time.perf_counter()
    images = list(rendered.images)
    if job.paste is not None:  # swap: each redrawn crop back into the target, through the feathered mask
        images = [geometry.paste_face(job.paste.target, im, job.paste.box, job.paste.region) for im in images]
    timings_paste = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    analyzer = faces()
    # Where each image's face was drawn (the keypoint image, at the output's size) is looked at first. A
    # swap scores the face it redrew, and only that one: the target's other faces are untouched, and the
    # largest of them would score the target photo, not the swap.
    drawn = job.keypoint_image if job.paste is None else None
    at = job.paste.face if job.paste is not None else None
    people: list[dict[str, float | None]] = []
    margins: list[dict[str, dict[str, Any] | None]] = []
    mixed: list[str] = []
    if job.group:
        # Each face found matched to one person; the image's score is the mean of the matched ones.
        matches = [match_people_detail(analyzer, job.embeddings, image_to_array(im)) for im in images]
        scores = [[None if m is None else m.similarity for m in row] for row in matches]
        people = [dict(zip(job.people, row, strict=True)) for row in scores]
        if len(job.people) > 1:
            margins, mixed = _margins(job.people, matches)
        sims = [None if not (got := [v for v in row if v is not None]) else round(sum(got) / len(got), 4)
                for row in scores]
    else:
        sims = [
            identity_similarity(analyzer, job.embedding, image_to_array(im), drawn, at=at)
            for im in images
        ]
        if job.people:  # a group of one
            people = [{job.people[0]: sim} for sim in sims]
    timings = {**job.timings_ms, **rendered.timings_ms, "identity_check_ms": (time.perf_counter() - t0) * 1000}
    if job.paste is not None:
        timings["paste_ms"] = timings_paste
    timings["total_ms"] = (time.time() - job.started) * 1000
    warnings = list(job.warnings) + mixed
    refined = [plan.label for plan in job.refine]
    if refined:
        warnings.append(f"Refined small face(s), re-rendered at working size: {', '.join(refined)}.")
    return Result(
        images=images,
        seed=job.seed,
        similarities=sims,
        keypoint_image=job.keypoint_image,
        timings_ms={k: round(v, 1) for k, v in timings.items()},
        # A swap's images are the whole target photo, not the working size of its crop.
        width=images[0].width if job.paste is not None and images else job.width,
        height=images[0].height if job.paste is not None and images else job.height,
        num_steps=job.num_steps,
        guidance_scale=job.guidance_scale,
        faces_found=job.faces_found,
        profile=profile,
        warnings=warnings,
        person_similarities=people,
        person_margins=margins,
        refined=refined,
    )


def _margins(
    names: list[str], matches: list[list[PersonMatch | None]]
) -> tuple[list[dict[str, dict[str, Any] | None]], list[str]]:
    """Per image, each person's margin as the result carries it; and a warning for each face that looks more
    like another person of the request than like its own (a negative margin: the identities mixed)."""
    margins: list[dict[str, dict[str, Any] | None]] = []
    warnings: list[str] = []
    for index, row in enumerate(matches):
        shown: dict[str, dict[str, Any] | None] = {}
        for name, m in zip(names, row, strict=True):
            if m is None or m.margin is None or m.nearest_other is None:
                shown[name] = None
                continue
            other = names[m.nearest_other]
            shown[name] = {"margin": m.margin, "nearest_other": other}
            if m.margin < 0:
                where = f"Image #{index + 1}: " if len(matches) > 1 else ""
                warnings.append(
                    f"{where}{name}'s face looks more like {other} than like {name} (similarity "
                    f"{m.similarity:.2f} to {name}, {m.similarity - m.margin:.2f} to {other}); try another seed."
                )
        margins.append(shown)
    return margins, warnings
