"""Hugging Face Space entry point: build the UI, start loading the models, launch.

Hugging Face Spaces imports this module and serves `demo`; `python app.py` launches it locally
(GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are read by Gradio itself). Every knob is an environment
variable read by `instantid.settings`; see the README.
"""

# First, before anything loads torch: the package sets OpenMP's wait policy (instantid/__init__.py). It imports
# no torch, so `spaces` below still comes before anything touches CUDA: on ZeroGPU it patches torch.cuda so the
# models can be placed on "cuda" at start-up while the real GPU is attached only inside @spaces.GPU.
import instantid  # noqa: I001, F401 - import order matters here
import spaces  # noqa: F401 - import order matters here

import importlib.util
import logging
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from instantid.frontends import api
from instantid.frontends.gradio_adapter import bound_log_records, guard_requests, upload_guard
from instantid.frontends.mcp_adapter import app_lifespan
from instantid.models.memory import is_zerogpu
from instantid.settings import get_settings
from instantid.frontends.ui import build_demo

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
CSS_PATH = ASSETS / "style.css"

# Public-domain photos (assets/LICENSES.md): one face each, and the two of them in one photo.
ASTRONAUT, HOPPER, PAIR = (str(ASSETS / name) for name in ("astronaut.jpg", "grace_hopper.jpg", "two_people.jpg"))
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "generate": [
        {"face_image": ASTRONAUT, "prompt": "a portrait of a woman as an astronaut on Mars, helmet under her arm, "
         "golden hour", "style": "Mars", "framing": "photo", "head_angle": "photo"},
        {"face_image": ASTRONAUT, "prompt": "a woman reading in a rainy café at night, neon reflections",
         "style": "Neon", "framing": "photo", "head_angle": "photo"},
        {"face_image": HOPPER, "prompt": "a detective in a trench coat under a street lamp", "style": "Film Noir",
         "framing": "photo", "head_angle": "photo"},
        # Two people in the photo: the larger face (Grace Hopper's) gives the identity.
        {"face_image": PAIR, "prompt": "a woman in a garden, spring flowers", "style": "Watercolor",
         "framing": "photo", "head_angle": "photo"},
        # The same head shots composed otherwise: a framing each (the prompt names what it shows), and a turned head.
        {"face_image": HOPPER, "prompt": "a portrait of a woman looking out to sea, windswept hair, soft morning light",
         "style": "(No style)", "framing": "portrait", "head_angle": "left"},
        {"face_image": ASTRONAUT, "prompt": "a woman in a leather jacket leaning on a motorbike in a city street at "
         "dusk, half body", "style": "Vibrant Color", "framing": "half body", "head_angle": "photo"},
        {"face_image": HOPPER, "prompt": "a woman walking in a park in autumn, full body", "style": "Watercolor",
         "framing": "full body", "head_angle": "photo"},
    ],
    "restyle": [
        {"face_image": HOPPER, "source_image": ASTRONAUT, "prompt": "a portrait of an astronaut",
         "style": "Watercolor"},
    ],
    "swap": [
        # Face numbers go largest first: 1 is the astronaut in the two-person photo, 0 Grace Hopper.
        {"face_image": HOPPER, "target_image": PAIR, "face_index": 1, "prompt": "a smiling woman"},
        {"face_image": ASTRONAUT, "target_image": PAIR, "face_index": 0, "prompt": "an elderly officer"},
    ],
    "group": [
        # The two-person photo gives the layout: left to right, person 1 (the astronaut) then person 2, each where
        # she stands in it; order "2,1" would swap their places.
        {"person_1": [ASTRONAUT], "person_2": [HOPPER], "names": "Eileen, Grace", "layout_image": PAIR,
         "prompt": "two friends laughing at a café table, film photo"},
    ],
}

log = logging.getLogger("instantid.app")
settings = get_settings()


def examples() -> dict[str, list[dict[str, Any]]]:
    """Each mode's examples whose photos are all present (a trimmed copy of the Space may lack assets/)."""
    def present(row: dict[str, Any]) -> bool:
        photos = [v for k, v in row.items() if k.endswith("_image")]
        photos += [p for k, v in row.items() if k.startswith("person_") for p in v]
        return all(Path(v).is_file() for v in photos)

    shown = {mode: [row for row in rows if present(row)] for mode, rows in EXAMPLES.items()}
    return {mode: rows for mode, rows in shown.items() if rows}


def mcp_enabled() -> bool:
    """MCP needs the `gradio[mcp]` extra; without it we say so and serve the app without MCP."""
    if not settings.mcp_server:
        return False
    if importlib.util.find_spec("mcp") is None:
        log.warning('GRADIO_MCP_SERVER is on but the `mcp` package is missing: pip install "gradio[mcp]"')
        return False
    return True


demo = build_demo(api.ENDPOINTS, api.status, settings=settings, examples=examples(), sample_memory=True,
                  estimate_fn=api.estimate)
demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
# File references outside the upload folder refused by name, and Gradio's other refusals without server paths.
guard_requests(demo)

if is_zerogpu():
    # ZeroGPU: everything, extras included, loads here, in the main thread and before `launch`: `spaces`
    # packs at launch what was placed on "cuda" until then, and only sees placements made in the thread that
    # imported it. A GPU call that loaded anything would lose it with its worker, on the visitor's time.
    from instantid.engine import get_engine

    get_engine(settings).load_all()
elif settings.preload:
    # Non-blocking: the page is served within seconds; the Status tab shows the load, the first request waits.
    from instantid.engine import get_engine

    get_engine(settings).start_background_load()


def launch(**kwargs) -> None:
    """Launch with the app's css and theme (`python app.py`); keyword arguments go to `demo.launch`."""
    options = {
        "css_paths": [CSS_PATH] if CSS_PATH.is_file() else None,
        "theme": gr.themes.Soft(),
        "mcp_server": mcp_enabled(),
        "footer_links": ["api", "gradio", "settings"],
        # Refuse oversized uploads at the door; instantid.vision.images checks bytes and pixels again.
        "max_file_size": settings.max_upload_bytes,
        # Only our assets need serving besides Gradio's own cache (examples are read from here).
        "allowed_paths": [str(ASSETS)],
        # Gradio's own refusals before our code runs (a server path or a URL in place of an upload) reach the
        # client with their sentence instead of `{"error": null}`; our handlers raise only gr.Error anyway.
        "show_error": True,
        "app_kwargs": {
            # Bounds what one client keeps parked in the upload folder, and deletes aborted uploads' partial files.
            "middleware": [upload_guard(get_upload_folder(), settings.max_upload_bytes)],
            # Fits Gradio's MCP tools to real MCP clients before the first request (instantid.frontends.mcp_adapter).
            "lifespan": app_lifespan(demo, settings.max_upload_bytes, settings.max_upload_pixels),
        },
    }
    options.update(kwargs)
    demo.launch(**options)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bound_log_records()  # no request payload reaches the log whole
    launch()
