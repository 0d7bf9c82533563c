"""The face model files: which ONNX file in a folder (or a repo) is the detector and which the recognizer,
by name where the name says it (antelopev2, buffalo_*), else by the inputs and outputs insightface routes
models with. Only those two are ever built (faces.py's `FaceAnalyzer`).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

# Cheap name heuristics that identify the two files we need without building the other models.
# antelopev2: scrfd_10g_bnkps + glintr100; buffalo_*: det_10g/det_500m + w600k_r50/w600k_mbf.
_DETECTOR_NAME = re.compile(r"^(scrfd|retinaface|det_)", re.IGNORECASE)
_RECOGNIZER_NAME = re.compile(r"^(glint|w600k|arcface|ms1m|webface)|(^|_)r(18|34|50|100)(_|$)", re.IGNORECASE)
# Files we know are neither, so the content probe never spends time parsing them.
_OTHER_NAME = re.compile(r"^(1k3d68|2d106det|genderage|inswapper)", re.IGNORECASE)
EXPECTED_FILES = (
    "a face detector and a face recognizer ONNX file, as in insightface's antelopev2 folder "
    "(scrfd_10g_bnkps.onnx and glintr100.onnx)"
)


def role_by_name(filename: str) -> str | None:
    """"detection" or "recognition" as an insightface model file's name says, None for any other name.

    The one naming rule for both the folder search below and the choice of files fetched from a repo.
    """
    stem = Path(filename).stem
    if _OTHER_NAME.search(stem):
        return None
    if _DETECTOR_NAME.search(stem):
        return "detection"
    return "recognition" if _RECOGNIZER_NAME.search(stem) else None


# --- finding the model files ---------------------------------------------------------------------


def _onnx_role(path: Path) -> str | None:
    """'detection', 'recognition' or None, by the same input/output rules insightface routes models with."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged or foreign file is simply "not this role"
        return None
    graph = model.graph
    # Old exporters list weights as graph inputs too; onnxruntime (and so insightface) does not count them.
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if not inputs:
        return None
    if len(graph.output) >= 5:
        return "detection"
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(inputs) == 1 and len(graph.output) == 1 and len(dims) == 4:
        side = dims[2]
        # 192 is the landmark model and 96 the gender/age model; ArcFace takes 112 (or 128, 160...).
        if side == dims[3] and side >= 112 and side % 16 == 0 and side != 192:
            return "recognition"
    return None


def _pick(
    files: list[Path], name_rule: re.Pattern[str], role: str, exclude: Path | None, roles: dict[Path, str | None]
) -> Path | None:
    named = [f for f in files if name_rule.search(f.stem) and f != exclude]
    if len(named) == 1:
        return named[0]
    # Ambiguous or unknown names: look inside, named files first, largest first (scrfd_10g over
    # scrfd_500m, and tiny helper graphs such as scrfd_nms last). `roles` caches each file's verdict,
    # so a large recognizer is parsed once even when both searches visit it.
    rest = [f for f in files if f not in named and f != exclude and not _OTHER_NAME.search(f.stem)]
    for group in (named, rest):
        for f in sorted(group, key=lambda p: p.stat().st_size, reverse=True):
            if f not in roles:
                roles[f] = _onnx_role(f)
            if roles[f] == role:
                return f
    return None


def find_face_models(folder: str | Path) -> tuple[Path, Path]:
    """The (detector, recognizer) ONNX files in `folder`.

    File names identify them when they are unambiguous (antelopev2, buffalo_*), so the three other
    antelopev2 models are never opened; otherwise each candidate's inputs and outputs are inspected.
    Raises `CheckpointError` naming the folder and what it must hold.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"The face model folder {folder} does not exist: it must hold {EXPECTED_FILES}.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    roles: dict[Path, str | None] = {}
    detector = _pick(files, _DETECTOR_NAME, "detection", None, roles)
    recognizer = _pick(files, _RECOGNIZER_NAME, "recognition", detector, roles)
    if detector is None or recognizer is None:
        missing = " and ".join(
            name for name, found in (("detector", detector), ("recognizer", recognizer)) if found is None
        )
        present = ", ".join(p.name for p in files) or "no .onnx files"
        raise CheckpointError(
            f"No face {missing} model found in {folder} (it holds {present}): it must hold {EXPECTED_FILES}."
        )
    return detector, recognizer
