"""The CPU stage after the GPU: a swap's faces pasted back, each image's identity scored (people matched to
the faces found, in a group), warnings and timings gathered into the `Result`."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..vision import geometry
from ..vision.faces import FaceAnalyzer, identity_similarity, match_people
from ..vision.images import image_to_array
from .requests import Job, Rendered, Result


def finish(job: Job, rendered: Rendered, faces: Callable[[], FaceAnalyzer], profile: str) -> Result:
    """The request's result: identity similarity of each image, warnings, timings. `faces()` is the face
    analyzer; `profile` the name of the memory profile the images were made with."""
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
    if job.group:
        # Each face found matched to one person; the image's score is the mean of the matched ones.
        scores = [match_people(analyzer, job.embeddings, image_to_array(im)) for im in images]
        people = [dict(zip(job.people, row, strict=True)) for row in scores]
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
    warnings = list(job.warnings)
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
        refined=refined,
    )
