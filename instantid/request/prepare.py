"""The CPU stage before the GPU: validate, decode the photos, find the faces, lay out every condition image.

`prepare(request, workshop)` -> the `Job` that `render` runs. Needs the face models only (onnxruntime on the
CPU), never the diffusion models or a GPU; what it needs of the engine comes in the `Workshop`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image

from ..declaration import DEFAULT_PROMPT, DEFAULT_SCHEDULER, MODE_SPECS, PARAMS, random_seed
from ..errors import BusyError, CheckpointError, ImageError, InvalidParameter
from ..settings import CONTROL_TYPES
from ..styles import apply_style
from ..vision import framing, geometry
from ..vision.faces import Face, FaceAnalyzer, average_embedding
from ..vision.images import image_to_array
from .requests import Job, Refine, Request
from .scenes import SCENES, Workshop


def prepare(req: Request, ws: Workshop, started: float) -> Job:
    """The request's job; `started` is the wall clock when the request came in (the stages may run in different
    processes). The engine checks first what this server cannot run (`Engine.check`)."""
    from ..models.prompts import check_emphasis

    # Before any photo is decoded or GPU time asked for: the styles' templates add no emphasis.
    check_emphasis(req.prompt, "prompt")
    check_emphasis(req.negative_prompt, "negative_prompt")
    speed = req.sampling
    # The cpu profile's fewer steps are for the base sampler; a LoRA is distilled for its own count.
    steps = req.num_steps or ((speed.lora is None and ws.profile.default_steps) or speed.steps)
    guidance = req.guidance_scale or speed.guidance
    spec = MODE_SPECS[req.mode]
    # Only a mode that takes `strength` runs part of the schedule (restyle); an inpainting one redraws its
    # region from noise.
    strength = req.strength if req.mode in PARAMS["strength"].modes else 1.0
    if min(int(steps * strength), steps) < 1:
        # diffusers would run no step at all and fail; say what works instead.
        raise InvalidParameter("strength", strength, f"runs no step of {steps}: use at least {1 / steps:.2f}")
    num_images = min(req.num_images, ws.profile.max_images)
    timings: dict[str, float] = {}
    warnings = list(req.notes) + speed_warnings(req, guidance)
    if num_images < req.num_images:
        warnings.append(f"This hardware ({ws.profile.name} profile) makes at most {num_images} images.")

    t0 = time.perf_counter()
    people: list[tuple[np.ndarray, Face]] = []
    if spec.people:
        embedding, ref_img, ref_face, faces_found, people = find_people(ws, req, warnings)
    else:
        embedding, ref_img, ref_face, faces_found = find_identity(ws, req, warnings)
    timings["faces_ms"] = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    canvas = SCENES[req.mode](ws, req, ref_img, ref_face, warnings, people)
    spots = canvas.pop("spots", [])
    if req.refines:
        if spec.people:
            identities, labels = [e for e, _ in people], list(req.person_names)
        else:
            identities, labels = [embedding], ["the face"]
        size = (canvas["width"], canvas["height"])
        canvas["refine"] = refine_plans(ws, req, size, spots, identities, labels, warnings)
    timings["conditions_ms"] = (time.perf_counter() - t1) * 1000

    prompt = base = req.prompt.strip()  # `base`: what the refined faces are drawn with
    words = framing.FRAMINGS[req.framing].words if req.composed else ""
    if not prompt:
        prompt = base = DEFAULT_PROMPT
        if words and framing.framed_prompt(req.framing, DEFAULT_PROMPT) is not None:
            prompt = f"{words} of a person, high quality, detailed face"  # the default names a portrait
        warnings.append(f"Empty prompt: used '{prompt}'.")
    elif words and (framed := framing.framed_prompt(req.framing, prompt)) is not None:
        prompt = framed
        warnings.append(f"Framing {req.framing}: '{words}' put before the prompt; name the framing in your prompt "
                        "to word it yourself.")
    # A refined face is redrawn in a crop around it, where the framing's words would ask for a whole body again.
    refine_prompt = apply_style(req.style, base, req.negative_prompt.strip())[0] if base != prompt else ""
    prompt, negative = apply_style(req.style, prompt, req.negative_prompt.strip())
    return Job(
        prompt=prompt,
        negative_prompt=negative,
        refine_prompt=refine_prompt,
        embedding=embedding,
        num_images=num_images,
        num_steps=steps,
        guidance_scale=guidance,
        identitynet_strength=req.identitynet_strength,
        adapter_strength=req.adapter_strength,
        scheduler=speed.scheduler or req.scheduler,
        speed=speed.name,
        seed=req.seed if req.seed is not None else random_seed(),
        faces_found=faces_found,
        warnings=warnings,
        timings_ms=timings,
        started=started,
        mode=req.mode,
        strength=strength,
        people=list(req.person_names),
        embeddings=[embedding for embedding, _ in people],
        **canvas,
    )


def check(req: Request, max_side: int, load_error: str | None, unavailable: Mapping[str, str]) -> None:
    """Refuse, before any GPU time, what this server cannot run: a size over `max_side`, a server whose start-up
    load failed (`load_error`, its reason), or parts that did not load at start-up (`unavailable`: a part's
    name -> the reason)."""
    limit = max_side
    for name in ("width", "height"):
        if getattr(req, name) > limit:
            raise InvalidParameter(name, getattr(req, name), f"use 0 (automatic) or a multiple of 64 up to {limit}")
    if load_error is not None:
        raise BusyError(
            f"The models did not load when the server started ({load_error}); "
            "the Space must be restarted, ask its owner."
        )
    speed = req.sampling.name
    for name in [*req.controlnets, speed]:
        reason = unavailable.get(name)
        if reason is None:
            continue
        if name in CONTROL_TYPES:
            what, fix = f"The {name} ControlNet", f"untick '{name}' in the extra ControlNets"
        elif name == "lcm":
            what, fix = "LCM fast mode", "switch LCM off, or choose speed fast or turbo"
        else:
            what, fix = f"Speed {name}", "choose speed quality"
        raise CheckpointError(f"{what} is not available on this server ({reason}): {fix}.")


def _embedded(ws: Workshop, analyzer: FaceAnalyzer, src: Any, what: str, warnings: list[str]) -> tuple[Any, Face, int]:
    """One photo (`what`, as messages name it) decoded, with its largest face (embedded) and how many it holds;
    more than one is said in `warnings`."""
    img = ws.decode(src, what, warnings)
    face, count = analyzer.embed_largest(image_to_array(img), what=what)
    if count > 1:
        warnings.append(f"Found {count} faces in the {what}; using the largest.")
    return img, face, count


def find_identity(ws: Workshop, req: Request, warnings: list[str]) -> tuple[np.ndarray, Any, Face, int]:
    """The averaged identity embedding, the first face photo, its largest face and how many it holds."""
    analyzer = ws.faces()
    embeddings = []
    ref_img = ref_face = None
    faces_found = 0
    for i, src in enumerate(req.face_images):
        img, face, count = _embedded(ws, analyzer, src, "face photo" if i == 0 else f"extra face photo {i}", warnings)
        embeddings.append(face.embedding)
        if i == 0:
            # Only the first photo's pixels are used again: up to 8 extra 50-megapixel photos must not
            # all stay decoded at once (150 MB each), only their embeddings.
            ref_img, ref_face, faces_found = img, face, count
        del img
    assert ref_face is not None  # Request holds at least one face photo
    return average_embedding(embeddings), ref_img, ref_face, faces_found


def find_people(
    ws: Workshop, req: Request, warnings: list[str]
) -> tuple[np.ndarray, Any, Face, int, list[tuple[np.ndarray, Face]]]:
    """Group: each person's averaged embedding and the largest face of their first photo, in person order;
    and, as `find_identity` gives them, the first person's embedding, first photo, face and face count."""
    analyzer = ws.faces()
    people: list[tuple[np.ndarray, Face]] = []
    ref_img: Any = None
    faces_found = 0
    for k, (name, photos) in enumerate(zip(req.person_names, req.people, strict=True)):
        embeddings = []
        first: Face | None = None
        for i, src in enumerate(photos):
            # The person's name in every message: with four people, "the face photo" would not say whose.
            what = f"photo of {name}" if len(photos) == 1 else f"photo {i + 1} of {name}"
            img, face, count = _embedded(ws, analyzer, src, what, warnings)
            embeddings.append(face.embedding)
            if i == 0:
                first = face
                if k == 0:  # only one photo stays decoded: the first person's (one person: the layout)
                    ref_img, faces_found = img, count
            del img
        assert first is not None  # Request gives every person a photo
        people.append((average_embedding(embeddings), first))
    return people[0][0], ref_img, people[0][1], faces_found, people


def refine_plans(
    ws: Workshop, req: Request, size: tuple[int, int], spots: list[tuple[np.ndarray, Any]],
    identities: list[np.ndarray], labels: list[str], warnings: list[str],
) -> list[Refine]:
    """The faces on a `size` canvas (keypoints and box per person, where the layout put them) that are small
    enough to refine, each as a swap onto the image with its person's identity."""
    plans = []
    for (kps, bbox), identity, label in zip(spots, identities, labels, strict=True):
        if not geometry.needs_refining(bbox, ws.working_short_side()):
            continue
        try:
            box, crop_size, work, work_kps, in_crop, in_work = ws.redraw_geometry(size, bbox, kps)
        except ImageError:
            warnings.append(f"{label[:1].upper()}{label[1:]} is not refined: the layout puts it across the "
                            "image's edge.")
            continue
        redraw = geometry.swap_region(work, in_work, feather=False)
        plans.append(Refine(
            label=label, embedding=identity, box=box, width=work[0], height=work[1],
            keypoint_image=geometry.draw_keypoints(work, work_kps),
            mask_image=PIL.Image.fromarray((redraw * 255).astype(np.uint8), mode="L"),
            face_mask=geometry.face_mask(work, in_work) if req.enhance_face_region else None,
            region=geometry.swap_region(crop_size, in_crop),
        ))
    return plans


def speed_warnings(req: Request, guidance: float) -> list[str]:
    """What a request asks that its speed ignores: a LoRA speed's own sampler, no guidance's negative prompt."""
    speed = req.sampling
    out = []
    if speed.scheduler is not None and req.scheduler != DEFAULT_SCHEDULER:
        out.append(f"Speed {speed.name} uses its own sampler ({speed.scheduler}); the scheduler choice applies to "
                   "speed quality only.")
    if guidance <= 1 and req.negative_prompt.strip():
        out.append("Guidance is off (speed turbo, or a guidance scale of 1 or less): the negative prompt has no "
                   "effect.")
    return out
