"""framing: where framing and head angle put the face, measured from the drawn keypoint image, and what a full body's
refined face costs.

1. Geometry: on the tiny preset (the real face detector), for two real photos (assets/astronaut.jpg and
   assets/grace_hopper.jpg), each framing and each named head angle, `Engine.prepare` at the framing's SDXL canvas
   given as width and height (framing photo: 1024 x 1024). From the keypoint image alone: each keypoint's disc is the
   pixels exactly equal to its colour (`geometry.KPS_COLORS`; the limbs are dimmed, so they differ), its centre their
   centroid. Then, each against what was asked:
   - eye_line: the eyes' mean y over the canvas height, against the framing's `eye_line`;
   - face_share: (drawn mouth line - drawn eye line) / height, over the face's own eyes-to-mouth span / its box
     height (`framing.turned`'s keypoints and box at the angle; the detected face for angle photo): the face box's
     height over the canvas height, against the framing's `face_share`;
   - eye_angle: the drawn eyes' angle, against 0 (upright) for a named angle, the photo's own for angle photo;
   - yaw, pitch: fitted back from the drawn points with `framing.photo_pose` (the canonical face), against the
     angle asked (the same fit on the photo's own keypoints for angle photo);
   - own_yaw, own_pitch: the same fit with the person's own shape (`framing.frontal_shape`, the model `turned`
     rotates) in place of the canonical face: the turn alone, without the person's proportions read as a turn.
   For framing photo, eye_line and face_share are asked where the photo has them (`geometry.placed` of the face, or
   of the turned face, on the canvas).
   Relative error: |measured - asked| / |asked|; an angle asked 0 (nothing turned that way, the eyes upright) or
   kept from the photo is judged over its declared range instead (MAX_YAW, 45 degrees, for yaw and the eyes' angle;
   MAX_PITCH, 30, for pitch): 10 % of it is 4.5 and 3 degrees.
2. Time: `Engine.run` of a full-body image (its small face refined by default) against a photo-framing one, same
   face, prompt and seed, tiny preset at its working sizes; median of the runs, after one warm-up each.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = (ROOT / "assets" / "astronaut.jpg", ROOT / "assets" / "grace_hopper.jpg")
PHOTO_CANVAS = (1024, 1024)  # framing photo takes the photo's aspect: both photos are square
WITHIN = 0.10
SEED = 7


def disc_centres(keypoint_image: Any) -> tuple[Any, list[int]]:
    """Each keypoint's disc centre (5 x 2, x and y) in a drawn keypoint image, and its pixel count (a disc drawn
    over by a later one has fewer: its centroid then leans away from the overlap)."""
    import numpy as np

    from instantid.vision.geometry import KPS_COLORS

    pixels = np.asarray(keypoint_image.convert("RGB"))
    centres, counts = [], []
    for colour in KPS_COLORS:
        ys, xs = np.nonzero(np.all(pixels == np.array(colour, dtype=np.uint8), axis=2))
        if len(xs) == 0:
            raise ValueError(f"no pixel of keypoint colour {colour} in the drawing")
        # cv2.circle centres the disc on the point truncated to integers: the point lay within that pixel's unit,
        # half a pixel further on average.
        centres.append((xs.mean() + 0.5, ys.mean() + 0.5))
        counts.append(int(len(xs)))
    return np.array(centres), counts


def fitted_angles(model: Any, points: Any) -> tuple[float, float]:
    """(yaw, pitch) in degrees of `model` (5 x 3) seen in `points` (5 x 2): `framing.photo_pose`'s fit (a least-squares
    affine map, its rows made a rotation's) with another model than the canonical face."""
    import numpy as np

    from instantid.vision import framing

    model = np.asarray(model, dtype=np.float64)
    model = model - model.mean(axis=0)
    design = np.hstack([model, np.ones((5, 1))])
    solution, *_ = np.linalg.lstsq(design, np.asarray(points, dtype=np.float64), rcond=None)
    m = solution[:3].T
    r1 = m[0] / np.linalg.norm(m[0])
    r2 = m[1] - (m[1] @ r1) * r1
    r2 /= np.linalg.norm(r2)
    yaw, pitch, _ = framing.angles(np.vstack([r1, r2, np.cross(r1, r2)]))
    return yaw, pitch


def _over(asked: float, limit: float, named: bool) -> float | None:
    """What an angle's error is over: the angle itself when a name turned the face that way; the declared range
    (`limit`) when nothing is turned (0) or the photo's own angle is kept."""
    return None if named and asked != 0 else limit


def _row(photo: str, framing_name: str, angle: str, quantity: str, asked: float, measured: float,
         over: float | None = None) -> dict[str, Any]:
    """One measured quantity against what was asked; its relative error is over `asked`, or over `over` (an angle's
    declared range, in degrees) where given."""
    asked, measured = float(asked), float(measured)
    error = abs(measured - asked) / (abs(asked) if over is None else over)
    return {"photo": photo, "framing": framing_name, "head_angle": angle, "quantity": quantity,
            "asked": round(asked, 4), "measured": round(measured, 4), "rel_error": round(error, 4),
            "within_10pct": bool(error <= WITHIN)}


def geometry_rows(engine: Any, photos: tuple[Path, ...]) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """Every (photo, framing, named angle)'s rows, and each case's disc pixel counts."""
    import numpy as np

    from instantid.declaration import MAX_PITCH, MAX_YAW
    from instantid.request.requests import Request
    from instantid.vision import framing, geometry
    from instantid.vision.faces import Face
    from instantid.vision.images import image_to_array, load_image

    rows: list[dict[str, Any]] = []
    discs: dict[str, list[int]] = {}
    settings = engine.settings
    for path in photos:
        photo = path.name
        image, _ = load_image(str(path), max_bytes=settings.max_upload_bytes,
                              max_pixels=settings.max_upload_pixels, what="face photo")
        face, _ = engine.faces().embed_largest(image_to_array(image), what="face photo")  # prepare's own face
        own_shape = framing.frontal_shape(face.kps)
        photo_yaw, photo_pitch, _ = framing.angles(framing.photo_pose(face.kps)[1])
        photo_own = fitted_angles(own_shape, face.kps)
        for name, spec in framing.FRAMINGS.items():
            width, height = spec.canvas or PHOTO_CANVAS
            for angle, degrees in framing.HEAD_ANGLES.items():
                request = Request(face_images=[str(path)], prompt="a person", framing=name, head_angle=angle,
                                  width=width, height=height, seed=SEED)
                job = engine.prepare(request)
                points, counts = disc_centres(job.keypoint_image)
                discs[f"{photo} / {name} / {angle}"] = counts
                if degrees is None:
                    kps, box = np.asarray(face.kps, np.float64), tuple(float(v) for v in face.bbox)
                else:
                    turned_kps, box = framing.turned(face.kps, face.bbox, *degrees)
                    kps = np.asarray(turned_kps, np.float64)
                eyes, mouth = (points[0, 1] + points[1, 1]) / 2, (points[3, 1] + points[4, 1]) / 2
                own_span = ((kps[3, 1] + kps[4, 1]) / 2 - (kps[0, 1] + kps[1, 1]) / 2) / (box[3] - box[1])
                if spec.canvas is None:  # where the photo has the face, on this canvas
                    placed_kps, placed_box = geometry.placed(
                        image.size, Face(bbox=box, kps=kps.astype(np.float32), det_score=face.det_score),
                        (width, height))
                    eye_line = float(placed_kps[0, 1] + placed_kps[1, 1]) / 2 / height
                    face_share = (placed_box[3] - placed_box[1]) / height
                else:
                    eye_line, face_share = spec.eye_line, spec.face_share
                yaw, pitch, _ = framing.angles(framing.photo_pose(points)[1])
                own_yaw, own_pitch = fitted_angles(own_shape, points)
                asked_yaw, asked_pitch = (photo_yaw, photo_pitch) if degrees is None else degrees
                asked_own = photo_own if degrees is None else degrees
                asked_eye_angle = framing.eye_angle(face.kps) if degrees is None else 0.0
                named = degrees is not None
                case = (photo, name, angle)
                rows += [
                    _row(*case, "eye_line", eye_line, eyes / height),
                    _row(*case, "face_share", face_share, (mouth - eyes) / height / own_span),
                    _row(*case, "eye_angle", asked_eye_angle, framing.eye_angle(points), MAX_YAW),
                    _row(*case, "yaw", asked_yaw, yaw, _over(asked_yaw, MAX_YAW, named)),
                    _row(*case, "pitch", asked_pitch, pitch, _over(asked_pitch, MAX_PITCH, named)),
                    _row(*case, "own_yaw", asked_own[0], own_yaw, _over(asked_own[0], MAX_YAW, named)),
                    _row(*case, "own_pitch", asked_own[1], own_pitch, _over(asked_own[1], MAX_PITCH, named)),
                ]
    return rows, discs


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per quantity: how many rows, how many within 10 %, the largest relative error and where."""
    out: dict[str, dict[str, Any]] = {}
    for quantity in dict.fromkeys(r["quantity"] for r in rows):
        mine = [r for r in rows if r["quantity"] == quantity]
        worst = max(mine, key=lambda r: r["rel_error"])
        out[quantity] = {
            "rows": len(mine),
            "within_10pct": sum(r["within_10pct"] for r in mine),
            "max_rel_error": worst["rel_error"],
            "worst": f"{worst['photo']} / {worst['framing']} / {worst['head_angle']}: asked {worst['asked']}, "
                     f"measured {worst['measured']}",
        }
    return out


def timing(engine: Any, runs: int, log: Any) -> dict[str, Any]:
    """Median seconds of `Engine.run`, full body (refined) against framing photo, same face, prompt and seed; the
    two take turns, so a neighbour's load on a shared machine falls on both alike."""
    from instantid.request.requests import Request

    requests = {name: Request(face_images=[str(PHOTOS[0])], prompt="a person", framing=name, seed=SEED)
                for name in ("photo", "full body")}
    for request in requests.values():
        engine.run(request)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in requests}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in requests}
    results: dict[str, Any] = {}
    for _ in range(runs):
        for name, request in requests.items():
            t0 = time.perf_counter()
            results[name] = engine.run(request)
            seconds[name].append(time.perf_counter() - t0)
            stages[name].append(results[name].timings_ms)
    out: dict[str, Any] = {}
    for name, result in results.items():
        keys = [k for k in ("denoise_ms", "refine_ms") if k in result.timings_ms]
        out[name] = {"median_s": round(statistics.median(seconds[name]), 3),
                     "runs_s": [round(s, 3) for s in seconds[name]],
                     **{f"median_{k}": round(statistics.median(t[k] for t in stages[name]), 1) for k in keys},
                     "size": [result.width, result.height], "steps": result.num_steps, "refined": result.refined}
        log(f"{name}: {out[name]}")
    out["ratio"] = round(out["full body"]["median_s"] / out["photo"]["median_s"], 2)
    return out


def run(*, quick: bool = False, log: Any = print) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: the tiny cache only
    # Before torch loads OpenMP: spinning threads beside another OpenMP program made a tiny run 3-4x slower here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from instantid.engine import Engine
    from instantid.models.tiny import ensure_tiny_checkpoints
    from instantid.settings import Settings
    from instantid.vision import framing

    load_before = os.getloadavg()[0]
    runs = 1 if quick else 5  # the geometry takes a second: --quick shortens the timing only
    with tempfile.TemporaryDirectory(prefix="bench-framing-") as scratch:
        # A tiny cache already written (INSTANTID_TINY_CACHE, as the tests' and the CLI's) saves writing one here.
        cache = os.environ.get("INSTANTID_TINY_CACHE") or scratch
        settings = Settings.from_env({"INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": cache,
                                      "HF_HUB_OFFLINE": "1"})
        ensure_tiny_checkpoints(settings)
        engine = Engine(settings)
        rows, discs = geometry_rows(engine, PHOTOS)
        log(f"{len(rows)} rows, {sum(r['within_10pct'] for r in rows)} within 10 %")
        times = timing(engine, runs, log)
    summary = summarise(rows)
    return {
        "benchmark": "framing",
        "photos": [p.name for p in PHOTOS],
        "canvases": {name: list(spec.canvas or PHOTO_CANVAS) for name, spec in framing.FRAMINGS.items()},
        "framings": {name: {"face_share": spec.face_share, "eye_line": spec.eye_line}
                     for name, spec in framing.FRAMINGS.items() if spec.canvas},
        "head_angles": {name: list(a) for name, a in framing.HEAD_ANGLES.items() if a},
        "rows": rows,
        "summary": summary,
        "all_within_10pct": all(r["within_10pct"] for r in rows),
        "disc_pixels": discs,
        "full_disc_pixels": _full_disc(),
        "timing": times,
        "threads": torch.get_num_threads(),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-minute: others' work on a shared box
    }


def _full_disc() -> int:
    """The pixels of a disc no other covers (KPS_RADIUS, as cv2 fills it): the last colour drawn over all five."""
    import numpy as np

    from instantid.vision.geometry import KPS_COLORS, draw_keypoints

    drawing = np.asarray(draw_keypoints((64, 64), np.full((5, 2), 32, dtype=np.float32)))
    return int(np.all(drawing == np.array(KPS_COLORS[-1], dtype=np.uint8), axis=2).sum())
