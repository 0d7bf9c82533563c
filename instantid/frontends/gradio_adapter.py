"""The one place that reaches past Gradio's public API for the page and the HTTP API (MCP's is mcp_adapter.py):
how an endpoint's inputs are refused.

Why it exists: Gradio offers no public hook between an API payload and a component's own conversion.
Its refusals do not name the parameter ("Value 1000 is greater than maximum value 100." - which of 19?),
a value of the wrong type becomes an anonymous server error, it would read "false" as true and round
3.7 to 4, and a `gr.Image` opens every upload with PIL before our code sees it (so a file that is not an
image, or a bomb, would also end as an anonymous error instead of `instantid.vision.images`' sentence).

`guard_input` wraps one component instance's `preprocess` (a public method, replaced on the instance: a
subclass would make Gradio write a `.pyi` stub beside this file). Everything else in the app uses public
Gradio only: cancellation reaches `api.generate` because Gradio closes a generator whose client left.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import gradio as gr
import pydantic
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect

from ..declaration import Param, format_bound
from ..errors import InvalidParameter


def input_error(component: Any, name: str, value: Any, exc: Exception) -> str:
    """One sentence naming the parameter, the value and what the component accepts."""
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


UPLOAD_ONLY = (
    "send the photo itself as an upload (gradio_client: handle_file(path)); a URL, a data: URL or a path on the "
    "server is never read."
)


class _UploadModel:
    """A photo component's data model as Gradio validates a payload with it, before `preprocess`: a payload
    that is not an upload (a plain string, a number) gets our sentence instead of pydantic's raw report.
    Everything else (its JSON schema for the API page) is the component's own model."""

    def __init__(self, model: Any, name: str) -> None:
        self._model = model
        self._name = name

    def model_validate(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._model.model_validate(obj, *args, **kwargs)
        except pydantic.ValidationError:
            raise gr.Error(f"Invalid {self._name}: {UPLOAD_ONLY}", print_exception=False) from None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("_model", "_name"):  # copy/pickle probe before __init__ ran
            raise AttributeError(attr)
        return getattr(self._model, attr)


def _without_url_promise(schema: Any) -> Any:
    """A copy of an upload's JSON schema whose `url` field no longer offers "publicly available url"."""
    if isinstance(schema, list):
        return [_without_url_promise(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _without_url_promise(value) for key, value in schema.items()}
    url = out.get("properties", {}).get("url")
    if isinstance(url, dict) and "description" in url:
        url["description"] = "Set by gradio_client's handle_file; a URL of your own is refused."
    return out


def _api_info(component: Any, param: Param) -> Any:
    """The component's API description, told the way the parameter is checked: whole numbers are integers
    (a slider says "number", and gradio_client's view_api() then "float"), photos are uploads only (an
    image component says "a local filepath or publicly available URL")."""
    original = component.api_info

    def api_info() -> dict[str, Any]:
        info = dict(original())
        if param.kind == "integer":
            info["type"] = "integer"
        elif param.kind in ("image", "images"):
            what = "A photo" if param.kind == "image" else "Photos"
            info["additional_description"] = f"{what} sent as an upload: handle_file(path); URLs are refused."
            info = _without_url_promise(info)
        elif param.kind == "controls":
            # gr.JSON says `"type": {}`, which is no JSON Schema: MCP's validator refused every call of a tool
            # that has it, and gradio_client showed it as "Any".
            info = {"anyOf": [{"type": "object", "additionalProperties": {"type": "number"}}, {"type": "null"}],
                    "description": "{name: strength}, e.g. {\"pose\": 0.4}"}
        return info

    return api_info


def guard_input(component: Any, param: Param) -> None:
    """Check `param`'s value as sent (its declared kind and range) before the component converts it;
    hand photo uploads over undecoded. Gradio has already checked that an upload lies in its own cache."""
    original = component.preprocess
    hand_over = isinstance(component, gr.Image) and component.type == "filepath" and component.image_mode is None
    name = param.name
    component._instantid_param = name  # `guard_requests` names the parameter of a refused file reference
    component.api_info = _api_info(component, param)
    if param.kind in ("image", "images") and getattr(component, "data_model", None) is not None:
        component.data_model = _UploadModel(component.data_model, name)

    def preprocess(payload: Any) -> Any:
        if param.kind not in ("image", "images") and not (payload is None and param.kind != "boolean"):
            try:
                param.check(payload)
            except InvalidParameter as exc:
                # The page's own range (a server may allow less than the declaration) when it has one.
                ranged = isinstance(payload, (int, float)) and not isinstance(payload, bool)
                message = input_error(component, name, payload, exc) if ranged else str(exc)
                raise gr.Error(message, print_exception=False) from None
        if hand_over and payload is not None:
            # An object with only a URL: Gradio fetched nothing, and its own message would print the object. A
            # `data:` URL Gradio would decode itself, before any byte or pixel limit (a 31 MB one was), and
            # re-encode lossily (a swap's target came back with every pixel changed): refused the same way.
            if not payload.path or (payload.url or "").lstrip().lower().startswith("data:"):
                raise gr.Error(f"Invalid {name}: {UPLOAD_ONLY}", print_exception=False)
            return str(payload.path)
        try:
            return original(payload)
        except Exception as exc:  # every refusal of a value gets the same kind of sentence
            raise gr.Error(input_error(component, name, payload, exc), print_exception=False) from None

    component.preprocess = preprocess


# Gradio's Slider clamps a number typed into its box to the slider's range when the box loses focus, so a
# Steps of 1000 ran 100 steps without a word (its `blur` handler, gradio 6.31 js/slider). Stopped on its way
# down (capture phase, at the document), the blur never reaches that handler: the typed number is sent
# as typed and refused with `guard_input`'s sentence, as the API refuses it. Only the sliders' boxes
# ("number input for <label>"); a number box (the seed) never clamped.
# And Gradio 6.31 draws a closed accordion's inputs only when it is first opened, then, a few frames later, sets
# each of them to its props in the page's config, value included (`render_previously_invisible_children` in its
# core-*.js: after a tick, a settle and an animation frame it calls each new input's `set_data` with the layout
# tree's props, which never saw what was typed since). A number typed into a box shown in those frames went back
# to the config's (Width 512 to 0: every time when typed in the box's first animation frame, tests/test_browser.py;
# one run in two late in the whole suite, on a busy machine). The page itself sets a number box only after a
# visitor's action elsewhere (a speed resets Steps, an example or a run fills inputs), so for TYPED_HOLD_MS after a
# number is typed, until such an action, a box set to another number gets the typed one back (as if typed again).
TYPED_HOLD_MS = 2000
KEEP_TYPED_NUMBERS_JS = """() => {
    if (window.__instantidKeepTypedNumbers) return;
    window.__instantidKeepTypedNumbers = true;
    document.addEventListener("blur", (event) => {
        const box = event.target;
        if (box instanceof HTMLInputElement && box.type === "number"
            && (box.getAttribute("aria-label") || "").startsWith("number input for ")) {
            event.stopPropagation();
        }
    }, true);
    const isNumberBox = (el) => el instanceof HTMLInputElement && el.type === "number";
    const setValue = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set;
    // "12" and "12.0" are the same number (a box may rewrite it); "" (nothing or half typed) only equals "".
    const same = (a, b) => a === b || (a !== "" && b !== "" && Number(a) === Number(b));
    const typed = new Map();  // number box -> [the value typed, until when (performance.now() ms)]
    let restoring = false, watching = false;
    const watch = () => {
        const now = performance.now();
        for (const [box, [value, until]] of typed) {
            if (now > until || !box.isConnected) {
                typed.delete(box);
            } else if (!same(box.value, value)) {
                setValue.call(box, value);
                restoring = true;
                box.dispatchEvent(new Event("input", {bubbles: true}));
                restoring = false;
            }
        }
        watching = typed.size > 0;
        if (watching) requestAnimationFrame(watch);
    };
    document.addEventListener("input", (event) => {
        if (restoring || !isNumberBox(event.target)) return;
        typed.set(event.target, [event.target.value, performance.now() + HOLD_MS]);
        if (!watching) {
            watching = true;
            requestAnimationFrame(watch);
        }
    }, true);
    for (const kind of ["pointerdown", "keydown"]) {
        document.addEventListener(kind, (event) => { if (!isNumberBox(event.target)) typed.clear(); }, true);
    }
}""".replace("HOLD_MS", str(TYPED_HOLD_MS))


# --- uploads ------------------------------------------------------------------------------------------
# Gradio keeps every upload (POST /gradio_api/upload) until its hourly `delete_cache` sweep, whether a
# request uses it or not (15 x 20 MB in 4 s parked 300 MB), and an upload aborted mid-body leaves its
# partial temporary file behind, with a traceback in the log (gradio 6.31's multipart parser cleans up
# after its own refusals only). `UploadGuard` sits in front of that route, as an ASGI middleware
# (`launch(app_kwargs={"middleware": [...]})`, which Gradio hands to its FastAPI app).

UPLOAD_ROUTE = "/gradio_api/upload"
# What one client (address) may keep parked: beyond either bound its oldest uploads are deleted. A page
# request takes at most 10 photos (face, 7 more, pose or source or target), each up to the upload limit.
MAX_PARKED_UPLOADS = 20
MAX_PARKED_UPLOAD_LIMITS = 10  # bytes: this many times INSTANTID_MAX_UPLOAD_BYTES
# Above this many addresses, those whose uploads are all gone are forgotten.
MAX_TRACKED_CLIENTS = 1000
# Gradio streams an upload into a temporary file named tmp* directly in its upload folder, then moves it
# into a folder named after its hash before answering: a top-level tmp* file that no upload in progress
# holds is a partial one.
PARTIAL_PREFIX = "tmp"

log = logging.getLogger(__name__)

# Gradio's MCP server hands a tool's photos to the endpoint through gradio_client over loopback (gradio 6.31
# mcp.py: `Client(local_url, headers={"x-gradio-user": "mcp"})`), so the photos of every MCP client were uploads
# of one loopback address under one bound: 20 photos of other MCP clients deleted the photo of a call still
# waiting in the queue. The MCP adapter says whose each photo is before it is uploaded (`claim_mcp_upload`);
# the guard parks such an upload under that client. At most MAX_MCP_CLAIMS paths are remembered (oldest first
# forgotten: an upload that never came).
MCP_USER_HEADER = (b"x-gradio-user", b"mcp")
MAX_MCP_CLAIMS = 1000
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_mcp_claims: collections.OrderedDict[str, str] = collections.OrderedDict()


def claim_mcp_upload(path: str | Path, client: str) -> None:
    """The file at `path` (in the upload folder) is a photo `client` gave an MCP tool: parked under that client
    when this app's MCP server uploads it."""
    key = os.path.realpath(path)
    _mcp_claims.pop(key, None)
    _mcp_claims[key] = client
    while len(_mcp_claims) > MAX_MCP_CLAIMS:
        _mcp_claims.popitem(last=False)


def client_address(scope: dict) -> str:
    """Who sent an HTTP request (an ASGI scope): behind a proxy (a Space) every request comes from the proxy, so
    the first forwarded address is the client."""
    for name, value in scope.get("headers") or []:
        if name == b"x-forwarded-for" and value:
            return value.decode("latin-1").split(",")[0].strip()
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class UploadGuard:
    """ASGI middleware for Gradio's upload route: bounds what one client keeps parked (`MAX_PARKED_UPLOADS`
    files and `MAX_PARKED_UPLOAD_LIMITS` x `max_upload_bytes` bytes: its oldest uploads go first) and
    deletes the partial files of aborted uploads (logged in one line, without a traceback)."""

    def __init__(self, app: Any, upload_dir: str | Path, max_upload_bytes: int) -> None:
        self.app = app
        self.upload_dir = Path(upload_dir)
        self.max_bytes = MAX_PARKED_UPLOAD_LIMITS * max_upload_bytes
        self.in_flight = 0
        self.parked: dict[str, collections.deque[tuple[Path, int]]] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not scope["path"].endswith(UPLOAD_ROUTE):
            await self.app(scope, receive, send)
            return
        status: list[int] = []
        body: list[bytes] = []
        unparked: list[Path] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and status and status[0] == 200:
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    # Bounded before the answer leaves: a client that uploads again on receiving it must find
                    # the bound already applied (CI saw 11 of 10 when parking ran after the answer).
                    unparked.extend(self._park(client, b"".join(body), mcp))
            await send(message)

        client = client_address(scope)
        mcp = client in _LOOPBACK and MCP_USER_HEADER in (scope.get("headers") or [])
        # Counted before the first await: no upload can start between the last one ending and the sweep.
        self.in_flight += 1
        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            log.info("upload aborted by the client; its partial file is deleted")
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._delete_partial_files()
        if unparked:
            # Gradio moves a file it could not rename in a background task, after the answer: parked now.
            self._park(client, json.dumps([str(p) for p in unparked]).encode(), mcp)

    def _park(self, client: str, body: bytes, mcp: bool = False) -> list[Path]:
        """Parks the uploads the answer `body` names (`mcp`: uploaded by this app's MCP server, each under the
        client that claimed it); returns those not on disk yet."""
        try:
            paths = [Path(p) for p in json.loads(body) if isinstance(p, str)]
        except ValueError:
            return []
        if not mcp:
            return self._park_paths(client, paths)
        owners: dict[str, list[Path]] = {}
        for path in paths:
            owners.setdefault(_mcp_claims.get(os.path.realpath(path), client), []).append(path)
        return [p for owner, owned in owners.items() for p in self._park_paths(owner, owned)]

    def _park_paths(self, client: str, paths: list[Path]) -> list[Path]:
        missing: list[Path] = []
        if len(self.parked) > MAX_TRACKED_CLIENTS:
            # Forget the addresses whose uploads are all gone (Gradio's sweep): one entry per address ever seen
            # would grow without end.
            for other in list(self.parked):
                self._prune(other)
        parked = self.parked.setdefault(client, collections.deque())
        for path in paths:
            # An identical upload lands on the same path (Gradio names the folder after the content): it is
            # this upload's now, the newest, and must not be deleted as the oldest one.
            for entry in [e for e in parked if e[0] == path]:
                parked.remove(entry)
            try:
                parked.append((path, path.stat().st_size))
            except OSError:
                missing.append(path)
        self._prune(client)
        while len(parked) > MAX_PARKED_UPLOADS or sum(size for _, size in parked) > self.max_bytes:
            path, _ = parked.popleft()
            if any(path == p for other, kept in self.parked.items() if other != client for p, _ in kept):
                continue  # another client uploaded the same photo: it is theirs too
            with contextlib.suppress(OSError):
                path.unlink()
                path.parent.rmdir()  # its hash folder, when nothing else is in it
        self._prune(client)
        return missing

    def _prune(self, client: str) -> None:
        """Only what is still on disk counts (Gradio's sweep may have removed some)."""
        parked = self.parked.get(client)
        if parked is None:
            return
        kept = [(p, size) for p, size in parked if p.exists()]
        if not kept:
            del self.parked[client]
            return
        parked.clear()
        parked.extend(kept)

    def _delete_partial_files(self) -> None:
        try:
            entries = list(os.scandir(self.upload_dir))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(PARTIAL_PREFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def upload_guard(upload_dir: str | Path, max_upload_bytes: int) -> Middleware:
    """The `UploadGuard` for `launch(app_kwargs={"middleware": [...]})`."""
    return Middleware(UploadGuard, upload_dir=upload_dir, max_upload_bytes=max_upload_bytes)


# --- file references, errors and the log ----------------------------------------------------------
# Gradio checks a file reference of a request (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`) before any
# component sees it, and its refusal is a Python exception printed with its traceback: a relative path or a
# `file://` reference came back to the client as the absolute path of the server's checkout ("Cannot move
# /home/user/app/assets/x.jpg to the gradio cache dir ..."), and a `data:` URL sent as a path was written into
# the log whole, twice per request (OSError "File name too long" quoting it: 565 KB each). `guard_requests`
# refuses such references first, in a sentence that names the parameter, and turns every other exception that
# escapes Gradio's request processing into a bounded, path-free sentence (logged once, bounded too).

# The most of one log message (and of each line of a logged traceback) that is written; the rest is counted.
LOG_LIMIT = 400
# Where a server path stood in a message for a client.
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])(?:~|\.{1,2})?/(?:[\w.@+=%,-]+/)*[\w.@+=%,-]*")


def bounded(text: str, limit: int = LOG_LIMIT) -> str:
    """`text` cut to about `limit` bytes, saying how many were left out."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore") + f"... [{len(data) - limit:,} more bytes not shown]"


def _bounded_lines(text: str, limit: int) -> str:
    return "\n".join(bounded(line, limit) for line in text.split("\n"))


def bound_log_records(limit: int = LOG_LIMIT) -> None:
    """Every log record of this process (Gradio's, uvicorn's, MCP's, httpx's and ours) is written with its
    message cut to `limit` bytes, and its traceback's lines too: nothing a client sends reaches the log whole.
    A record factory rather than a handler's filter: it holds for handlers installed later (uvicorn's, at
    launch). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_instantid_bounded", False):
        return

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: left for logging's own report
            return record
        if len(message) > limit // 4 and len(message.encode("utf-8", "replace")) > limit:
            record.msg, record.args = bounded(message, limit), None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = _bounded_lines(logging.Formatter().formatException(record.exc_info), limit)
        return record

    make._instantid_bounded = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)


def client_sentence(exc: BaseException) -> str:
    """An unexpected exception's message as a client may see it: bounded, and without server paths."""
    text = _SERVER_PATH.sub("(a path on the server)", str(exc).strip() or type(exc).__name__)
    return bounded(text, 300)


def _file_refs(value: Any) -> list[dict[str, Any]]:
    from gradio_client import utils as client_utils

    found: list[dict[str, Any]] = []

    def keep(ref: dict[str, Any]) -> dict[str, Any]:
        found.append(ref)
        return ref

    client_utils.traverse(value, keep, client_utils.is_file_obj_with_meta)
    return found


def _uploaded(path: Any, upload_dir: str, blocked: list[str]) -> bool:
    """Whether a file reference's path is a file of Gradio's upload folder (uploads and results): the only
    files a request may name. Gradio's own rule for request inputs (`check_in_upload_folder`); never a URL."""
    from gradio import utils as gr_utils

    if not isinstance(path, str) or not path or len(path) > 4096 or "\0" in path or _URL_LIKE.match(path):
        return False
    try:
        allowed, _ = gr_utils.is_allowed_file(
            gr_utils.abspath(path), blocked_paths=blocked, allowed_paths=[], created_paths=[upload_dir]
        )
    except (OSError, ValueError):
        return False
    return bool(allowed)


_URL_LIKE = re.compile(r"^\s*(data:|[a-z][a-z0-9+.-]*:)", re.IGNORECASE)


def guard_requests(demo: Any) -> None:
    """Wrap `demo`'s request processing (Blocks.preprocess_data and process_api, which every queued and
    unqueued call and MCP's fast path go through): a file reference outside the upload folder is refused
    before Gradio reads it, naming the parameter; any other exception but `gr.Error` reaches the client as
    `client_sentence` and the log once, bounded. Idempotent."""
    from gradio.utils import get_upload_folder

    if getattr(demo, "_instantid_guarded", False):
        return
    demo._instantid_guarded = True
    preprocess_data = demo.preprocess_data
    process_api = demo.process_api

    async def guarded_preprocess_data(block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False):
        if not explicit_call:  # a Python call of the Blocks may name its own files, as in Gradio
            upload_dir, blocked = get_upload_folder(), list(getattr(demo, "blocked_paths", []) or [])
            for index, (block, value) in enumerate(zip(block_fn.inputs, inputs, strict=False)):
                if any(not _uploaded(ref.get("path"), upload_dir, blocked) for ref in _file_refs(value)):
                    name = getattr(block, "_instantid_param", None) or getattr(block, "label", None)
                    raise gr.Error(f"Invalid {name or f'input {index + 1}'}: {UPLOAD_ONLY}", print_exception=False)
        return await preprocess_data(block_fn, inputs, state, explicit_call)

    async def guarded_process_api(*args: Any, **kwargs: Any) -> Any:
        try:
            return await process_api(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            log.error("a request failed in Gradio's processing: %s", type(exc).__name__, exc_info=True)
            raise gr.Error(client_sentence(exc), print_exception=False) from None

    demo.preprocess_data = guarded_preprocess_data
    demo.process_api = guarded_process_api
