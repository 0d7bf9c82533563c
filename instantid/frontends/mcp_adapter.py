"""Gradio's MCP server fitted to real MCP clients: the second place (beside gradio_adapter.py) that reaches past
Gradio's public API, replacing steps of its server object (`demo.mcp_server_obj`) before the first request.

A photo an MCP tool receives becomes a file of Gradio's upload folder (`_McpPhotos`), so the endpoint gets it as
it gets one from gradio_client, under gradio_adapter.py's checks of uploads and file references.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pydantic

from .gradio_adapter import _uploaded, bounded, claim_mcp_upload, client_address

# --- MCP ------------------------------------------------------------------------------------------------
# Gradio serves each named endpoint as an MCP tool (gradio/mcp.py, `GradioMCPServer`), its schema made from the
# components' API descriptions, and calls it through gradio_client over loopback HTTP. Four of its defaults
# fail a real client (the official `mcp` package, 1.30): a photo list's schema keeps a `$ref` into `$defs` that
# sit under the property, not at the root (jsonschema: "PointerToNowhere"); a URL of this app's own upload is
# fetched as any URL, and refused as a loopback address; a data: URL is written to disk before any byte limit;
# the tool text tells the agent to use an `upload_file_to_gradio` tool that this server does not have; and a
# gallery comes back as the Python text of its dicts. `adapt_mcp` replaces those steps on the server object
# (`demo.mcp_server_obj`, made by `launch`), from `mcp_lifespan`, before the first request is served.

UPLOAD_FILE_ROUTE = "/gradio_api/file="


def photo_help(max_bytes: int, max_pixels: int) -> str:
    """How an MCP client gives a photo: Gradio's own convention for files (its `gradio upload-mcp` command does
    the same steps), or a data: URL; within the upload limits."""
    return (
        "Each photo is a string: a data: URL (data:image/jpeg;base64,...), or the http(s) URL of a file uploaded "
        "to this app: POST the file as the multipart form field `files` to <this app's URL>/gradio_api/upload, "
        'which answers a JSON list holding its path (["/tmp/gradio/.../photo.jpg"]), and pass <this app\'s URL>'
        f"{UPLOAD_FILE_ROUTE}<that path>. An image URL this app returned may be passed the same way. Any other "
        f"URL is refused, never fetched. At most {max_bytes / 2**20:g} MB and {max_pixels / 1e6:g} megapixels "
        "a photo."
    )


PHOTO_PARAM_HELP = "A data: URL or the URL of a file uploaded to this app (the tool's description says how)."
MCP_RESULT_HELP = (
    " The result: each image as image content with its URL (which the client may fetch) and its caption, then the "
    "seed, the identity similarities (JSON), the face keypoint image and the timings (JSON, with any warnings)."
)


def _size_mb(count: int) -> str:
    return f"{max(1, round(count / 1024))} KB" if count < 2**20 else f"{count / 2**20:.1f} MB"


class _McpPhotos:
    """The tool arguments' photos turned into files of Gradio's upload folder, which gradio_client then sends as
    uploads: the endpoint receives an MCP photo exactly as it receives one from gradio_client."""

    def __init__(self, max_bytes: int, upload_dir: str | None = None) -> None:
        from gradio.utils import get_upload_folder

        self.max_bytes = max_bytes
        self.upload_dir = upload_dir or get_upload_folder()

    def refuse(self, name: str, why: str) -> ValueError:
        return ValueError(f"Invalid {name}: {why}")

    def file(self, name: str, value: Any, client: str) -> dict[str, Any]:
        """The photo `client` (its address) gave for `name`, as the file gradio_client will upload: parked
        under that client by the upload guard (`claim_mcp_upload`), not under the MCP server's loopback."""
        from gradio_client import handle_file

        if not isinstance(value, str) or not value.strip():
            raise self.refuse(name, "give the photo as a data: URL or the URL of a file uploaded to this app.")
        text = value.strip()
        local = None
        if text[:5].lower() == "data:":
            local = self._from_data_url(name, text)
        elif text[:7].lower() == "http://" or text[:8].lower() == "https://":
            local = self._from_upload_url(name, text)
        if local is not None:
            claim_mcp_upload(local, client)
            return handle_file(local)
        raise self.refuse(name, f"{bounded(text, 80)!r} is neither a data: URL nor the URL of a file uploaded to "
                                "this app (a path on the server is never read).")

    def _from_data_url(self, name: str, url: str) -> str:
        import base64
        import binascii
        import mimetypes
        from urllib.parse import unquote_to_bytes

        from gradio.processing_utils import save_bytes_to_cache

        head, comma, body = url.partition(",")
        if not comma:
            raise self.refuse(name, "a data: URL needs a comma before its data (data:image/jpeg;base64,...).")
        is_base64 = head.lower().endswith(";base64")
        # Counted before decoding, as an upload's size is checked before it is read (instantid.vision.images).
        estimate = len(body) * 3 // 4 if is_base64 else len(body) // 3
        if estimate > self.max_bytes:
            raise self.refuse(name, f"the photo is about {_size_mb(estimate)}, over the {_size_mb(self.max_bytes)} "
                                    "limit: send a smaller or more compressed photo.")
        try:
            data = base64.b64decode(body, validate=True) if is_base64 else unquote_to_bytes(body)
        except (binascii.Error, ValueError):
            raise self.refuse(name, "the data: URL's base64 data is not valid.") from None
        if len(data) > self.max_bytes:
            raise self.refuse(name, f"the photo is {_size_mb(len(data))}, over the {_size_mb(self.max_bytes)} "
                                    "limit: send a smaller or more compressed photo.")
        if not data:
            raise self.refuse(name, "the data: URL holds no data.")
        mime = head[5:].split(";")[0].strip().lower()
        suffix = (mimetypes.guess_extension(mime) or ".img") if mime.startswith("image/") else ".img"
        # Named after its content in the upload folder, as Gradio names uploads, and swept with them.
        return save_bytes_to_cache(data, f"photo{suffix}", self.upload_dir)

    def _from_upload_url(self, name: str, url: str) -> str:
        from urllib.parse import unquote, urlsplit

        path = urlsplit(url).path
        marker = path.find(UPLOAD_FILE_ROUTE)
        local = unquote(path[marker + len(UPLOAD_FILE_ROUTE):]) if marker >= 0 else ""
        # Only a file of this app's upload folder is read, the files a request over HTTP may name too; whatever
        # the URL's host, nothing is fetched (the app's own address is a loopback one to itself).
        if not local or not _uploaded(local, self.upload_dir, []) or not Path(local).is_file():
            raise self.refuse(name, f"{bounded(url, 120)} is not the URL of a file uploaded to this app "
                                    f"(<this app's URL>{UPLOAD_FILE_ROUTE}<the path /gradio_api/upload answered>); "
                                    "other URLs are never fetched.")
        return local

    def convert(self, arguments: Any, positions: list[list[str | int]], client: str = "unknown") -> Any:
        """Gradio's `convert_strings_to_filedata`, for our photo parameters: a photo's position is [name], a photo
        list's [name, "items"] (Gradio matched list items against that and never converted them); `client`:
        the address of the MCP client that sent them."""
        if not isinstance(arguments, dict):
            return arguments
        single = {p[0] for p in positions if len(p) == 1}
        lists = {p[0] for p in positions if len(p) == 2 and p[1] == "items"}
        out = dict(arguments)
        for name, value in arguments.items():
            if value is None:
                continue
            if name in single:
                out[name] = self.file(name, value, client)
            elif name in lists:
                if not isinstance(value, list):
                    raise self.refuse(name, "give a list of photos (strings).")
                out[name] = [self.file(f"{name}[{i}]", item, client) for i, item in enumerate(value)]
        return out


def _mcp_schema(schema: dict[str, Any], positions: list[list[str | int]]) -> dict[str, Any]:
    """A tool's input schema as a JSON Schema validator accepts it: photos as plain strings (no `$defs` under a
    property, which a `$ref` from the root cannot reach), and no `"type": {}`."""
    import copy

    schema = copy.deepcopy(schema)
    properties = schema.get("properties", {})
    files = {p[0]: len(p) == 1 for p in positions if p and isinstance(p[0], str)}
    for name, prop in properties.items():
        if not isinstance(prop, dict):
            continue
        for key in ("$defs", "additional_description", "title"):
            prop.pop(key, None)
        if prop.get("type") == {}:
            prop.pop("type")
        if name in files:
            described = prop.get("description", "")
            kept = {k: prop[k] for k in ("description", "default") if k in prop}
            prop.clear()
            prop.update(kept)
            if files[name]:
                prop["type"] = "string"
            else:
                prop.update(type="array", items={"type": "string"})
            prop["description"] = f"{described} {PHOTO_PARAM_HELP}".strip()
    return schema


def adapt_mcp(server: Any, max_upload_bytes: int, max_upload_pixels: int) -> None:
    """Fit Gradio's MCP server object (`demo.mcp_server_obj`) to a real client (see above). Idempotent."""
    if server is None or getattr(server, "_instantid_adapted", False):
        return
    server._instantid_adapted = True
    from mcp import types

    help_text = photo_help(max_upload_bytes, max_upload_pixels)
    photos = _McpPhotos(max_upload_bytes)
    get_input_schema = server.get_input_schema
    get_fn_description = server.get_fn_description
    postprocess = server.postprocess_output_data
    pop_returned_state = server.pop_returned_state
    execute_with_progress = server._execute_tool_with_progress
    gradio_file_sentence = server._file_data_tool_description

    def input_schema(tool_name: str, parameters: dict[str, str] | None = None) -> Any:
        schema, positions = get_input_schema(tool_name, parameters)
        return _mcp_schema(schema, positions), positions

    def fn_description(block_fn: Any, tool_name: str) -> Any:
        description, parameters = get_fn_description(block_fn, tool_name)
        if gradio_file_sentence in description:
            # Gradio's sentence names an `upload_file_to_gradio` tool this server does not have, and its
            # "Returns:" tells the HTTP API's outputs: both replaced by what an MCP client gets and gives.
            head = description.split(gradio_file_sentence)[0].rstrip()
            description = f"{head}{'' if head.endswith('.') else '.'} {help_text}{MCP_RESULT_HELP}"
        return description, parameters

    def outputs(components: Any, data: Any) -> list[Any]:
        # Gradio's queued path hands over gradio_client's result, all the outputs as one item, where its unqueued
        # path (status) hands over one item per output: made alike here, where the endpoint's outputs are known.
        if len(components) > 1 and isinstance(data, list) and len(data) == 1 and isinstance(data[0], (list, tuple)) \
                and len(data[0]) == len(components):
            data = list(data[0])
        return pop_returned_state(components, data)

    def output(data: Any, root_url: str) -> list[Any]:
        from gradio_client import utils as client_utils

        contents: list[Any] = []
        for item in data:
            if isinstance(item, pydantic.BaseModel):  # the unqueued path's JSON output (a RootModel)
                item = item.model_dump()
            if isinstance(item, list) and item and all(
                isinstance(entry, dict) and client_utils.is_file_obj_with_meta(entry.get("image")) for entry in item
            ):  # a gallery: each image as image content, its URL, then its caption
                for entry in item:
                    contents += postprocess([entry["image"]], root_url)
                    if entry.get("caption"):
                        contents.append(types.TextContent(type="text", text=str(entry["caption"])))
            elif isinstance(item, (dict, list)) and not client_utils.is_file_obj_with_meta(item):
                contents.append(types.TextContent(type="text", text=json.dumps(item)))
            else:
                contents += postprocess([item], root_url)
        return contents

    def convert(arguments: Any, positions: list[list[str | int]]) -> Any:
        # Called within the tool call (gradio 6.31 `_prepare_tool_call_args`), where the MCP request is known.
        try:
            request = server.mcp_server.request_context.request
        except LookupError:  # outside a request: no client to name
            request = None
        return photos.convert(arguments, positions, client_address(request.scope) if request is not None else "unknown")

    server.get_input_schema = input_schema
    server.get_fn_description = fn_description
    server.convert_strings_to_filedata = convert

    async def with_progress(job: Any, progress_token: Any) -> Any:
        # A client that asks for progress got a refusal as "Error: <sentence>" (Gradio's title before the
        # message), where one that does not gets the sentence alone, as the HTTP API gives it.
        try:
            return await execute_with_progress(job, progress_token)
        except RuntimeError as exc:
            raise RuntimeError(str(exc).removeprefix("Error: ")) from None

    server.postprocess_output_data = output
    server.pop_returned_state = outputs
    server._execute_tool_with_progress = with_progress


def app_lifespan(demo: Any, max_upload_bytes: int, max_upload_pixels: int) -> Any:
    """For `launch(app_kwargs={"lifespan": ...})`: at the server's start-up, before any request is served,
    `adapt_mcp` on the MCP server that `launch` made (when it made one)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        adapt_mcp(getattr(demo, "mcp_server_obj", None), max_upload_bytes, max_upload_pixels)
        yield

    return lifespan
