"""MCP as its clients use it: the official `mcp` Python client (the one `gradio[mcp]` installs) against the real app.

The session's app (conftest's `tiny_app`) serves MCP by default, as the Space does. Every tool is called over
both of Gradio's transports (SSE at /gradio_api/mcp/sse, streamable HTTP at /gradio_api/mcp/) with the photos in
`assets/`, given as data: URLs and as URLs of files uploaded to the app (Gradio's convention for MCP files), and
the images come back as MCP image content with URLs the client can fetch. A refusal is an MCP error result
carrying the HTTP API's own sentence. In-process tests check the photo conversion's limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from mcp import ClientSession, types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from instantid.frontends.mcp_adapter import _McpPhotos
from tests import apprunner

ASSETS = apprunner.ROOT / "assets"
TOOLS = {"generate", "restyle", "swap", "group", "status"}
FAST = {"num_steps": 1, "seed": 1}
# A tiny generation takes a second; the first loads the models, on a busy 2-core machine much longer.
CALL_TIMEOUT = timedelta(seconds=300)


def data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def upload_url(app: apprunner.App, path: Path) -> str:
    """Gradio's convention for a file an MCP tool takes (its `gradio upload-mcp` tool does the same): POST it to
    the app's upload route, pass <app>/gradio_api/file=<the path it answered>."""
    with path.open("rb") as fh:
        answer = httpx.post(f"{app.url}gradio_api/upload", files={"files": (path.name, fh)}, timeout=30)
    answer.raise_for_status()
    return f"{app.url}gradio_api/file={answer.json()[0]}"


def in_session(app: apprunner.App, transport: str, work: Callable[[ClientSession], Awaitable[Any]]) -> Any:
    """Run `work` in an initialized session of the official client over `transport` ("sse" or "http")."""

    async def run() -> Any:
        async with contextlib.AsyncExitStack() as stack:
            if transport == "sse":
                read, write = await stack.enter_async_context(
                    sse_client(f"{app.url}gradio_api/mcp/sse", sse_read_timeout=300)
                )
            else:
                read, write, _ = await stack.enter_async_context(streamable_http_client(f"{app.url}gradio_api/mcp/"))
            session = await stack.enter_async_context(ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT))
            await session.initialize()
            return await work(session)

    return asyncio.run(run())


def images_of(result: types.CallToolResult) -> list[Image.Image]:
    images = []
    for item in result.content:
        if isinstance(item, types.ImageContent):
            image = Image.open(io.BytesIO(base64.b64decode(item.data)))
            image.load()
            images.append(image)
    return images


def texts_of(result: types.CallToolResult) -> list[str]:
    return [item.text for item in result.content if isinstance(item, types.TextContent)]


@pytest.fixture(scope="module")
def app(tiny_app: apprunner.App) -> apprunner.App:
    return tiny_app  # started without GRADIO_MCP_SERVER: MCP is on by default


@pytest.mark.parametrize("transport", ["sse", "http"])
def test_every_tool_returns_images_through_the_official_client(app: apprunner.App, transport: str) -> None:
    """generate, restyle, swap and group each give images (MCP image content, and URLs the client can fetch);
    status its report. Photos as data: URLs and as URLs of uploads, one photo list per kind of list."""
    astronaut, hopper, pair = (ASSETS / name for name in ("astronaut.jpg", "grace_hopper.jpg", "two_people.jpg"))
    calls = {
        # The extra ControlNets' mapping was `"type": {}` in the schema: every generate and restyle call failed.
        "generate": {"face_image": data_url(astronaut), "prompt": "a portrait", "extra_face_images":
                     [upload_url(app, astronaut)], "controlnets": {"canny": 0.4}, **FAST},
        "restyle": {"face_image": upload_url(app, hopper), "source_image": data_url(astronaut), "prompt": "a painting",
                    "num_steps": 2, "strength": 0.5, "seed": 1},
        "swap": {"face_image": data_url(hopper), "target_image": upload_url(app, pair), "face_index": 1,
                 "prompt": "a smiling woman", **FAST},
        # Photo lists' schema pointed at a `$defs` the client could not reach ("PointerToNowhere").
        "group": {"person_1": [data_url(astronaut)], "person_2": [upload_url(app, hopper)], "names": "Eileen, Grace",
                  "layout_image": upload_url(app, pair), "prompt": "two friends", **FAST},
    }

    async def work(session: ClientSession) -> dict[str, Any]:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
        results = {name: await session.call_tool(name, args) for name, args in calls.items()}
        results["status"] = await session.call_tool("status", {})
        return {"listed": listed, "results": results}

    done = in_session(app, transport, work)
    assert set(done["listed"]) == TOOLS
    for name, tool in done["listed"].items():
        # The description tells how to give a photo, and names no tool this server lacks.
        assert "upload_file_to_gradio" not in (tool.description or ""), name
        if name != "status":
            assert "/gradio_api/upload" in tool.description and "data: URL" in tool.description, tool.description
    for name in calls:
        result = done["results"][name]
        assert not result.isError, (name, texts_of(result))
        images = images_of(result)
        # The result images, then the face keypoint image.
        assert len(images) == 2 and all(min(image.size) >= 64 for image in images), (name, texts_of(result))
        urls = [text.removeprefix("Image URL: ") for text in texts_of(result) if text.startswith("Image URL: ")]
        assert len(urls) == 2, texts_of(result)
        fetched = httpx.get(urls[0], timeout=30)
        assert fetched.status_code == 200
        assert Image.open(io.BytesIO(fetched.content)).size == images[0].size
        if name == "group":
            assert any("Eileen" in text and "Grace" in text for text in texts_of(result)), texts_of(result)
    swap_target = Image.open(ASSETS / "two_people.jpg").size
    assert images_of(done["results"]["swap"])[0].size == swap_target  # the target photo, its face replaced
    status = done["results"]["status"]
    assert not status.isError
    report = json.loads(texts_of(status)[0])
    assert report["state"]["phase"] == "ready" and "components" in report


def test_a_refusal_is_an_mcp_error_with_the_api_sentence(app: apprunner.App, photos: dict[str, Path]) -> None:
    """A photo without a face and an out-of-range value: isError results, each with the sentence the HTTP API
    gives for the same request, also for a client that asks for progress (which then sees the steps)."""
    client = Client(app.url, verbose=False)
    expected = []
    for photo, extra in ((photos["noface"], FAST), (ASSETS / "astronaut.jpg", {"num_steps": 1000})):
        with pytest.raises(AppError) as caught:
            client.predict(handle_file(str(photo)), "a portrait", api_name="/generate", **extra)
        expected.append(str(caught.value))

    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def work(session: ClientSession) -> list[types.CallToolResult]:
        noface = {"face_image": data_url(photos["noface"]), "prompt": "a portrait", **FAST}
        return [
            await session.call_tool("generate", noface),
            await session.call_tool("generate", {"face_image": data_url(ASSETS / "astronaut.jpg"),
                                                 "prompt": "a portrait", "num_steps": 1000}),
            # A client that asks for progress (a progress token): Gradio's other path, the same sentence.
            await session.call_tool("generate", noface, progress_callback=on_progress),
            await session.call_tool("generate", {"face_image": data_url(ASSETS / "astronaut.jpg"), "prompt": "x",
                                                 "num_steps": 2, "seed": 1}, progress_callback=on_progress),
        ]

    *refused, generated = in_session(app, "sse", work)
    for result, sentence in zip(refused, [*expected, expected[0]], strict=True):
        assert result.isError and texts_of(result) == [sentence], (texts_of(result), sentence)
    assert "face" in expected[0].lower() and "num_steps=1000" in expected[1]
    assert not generated.isError and len(images_of(generated)) == 2, texts_of(generated)
    assert any("Step" in message for message in progress), progress


def test_a_url_that_is_not_an_upload_is_refused_unfetched(app: apprunner.App) -> None:
    """A file the app serves but no client uploaded (an asset), a loopback address and a public one: each an MCP
    error naming the parameter, nothing fetched (Gradio used to fetch any URL, and refused the app's own)."""
    asset = f"{app.url}gradio_api/file={ASSETS / 'astronaut.jpg'}"
    assert httpx.get(asset, timeout=30).status_code == 200  # served to a browser: it is the app's own asset

    async def work(session: ClientSession) -> list[types.CallToolResult]:
        return [
            await session.call_tool("generate", {"face_image": url, "prompt": "a portrait", **FAST})
            for url in (asset, f"{app.url}config", "https://example.com/face.jpg", str(ASSETS / "astronaut.jpg"))
        ]

    for result in in_session(app, "http", work):
        text = " ".join(texts_of(result))
        assert result.isError and text.startswith("Invalid face_image: "), text
        assert "/gradio_api/upload" in text or "never read" in text, text


def test_each_mcp_client_s_photos_count_against_its_own_upload_bound(app: apprunner.App) -> None:
    """Gradio's MCP server uploads a tool's photos over loopback, so they counted against one bound (20 photos)
    shared by every MCP client: 21 photos of others deleted a photo whose call was still waiting in the queue.
    Each client's photos count against its own bound now, by the address its MCP request came from (the first
    X-Forwarded-For on a Space); the bound itself still holds for each."""
    from instantid.frontends.gradio_adapter import MAX_PARKED_UPLOADS

    def noise_png(seed: int) -> bytes:
        pixels = np.random.default_rng([seed, 20261207]).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        return out.getvalue()

    def send(address: str, photos: list[bytes]) -> types.CallToolResult:
        urls = [f"data:image/png;base64,{base64.b64encode(p).decode()}" for p in photos]

        async def run() -> types.CallToolResult:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(sse_client(
                    f"{app.url}gradio_api/mcp/sse", headers={"X-Forwarded-For": address}, sse_read_timeout=300))
                session = await stack.enter_async_context(ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT))
                await session.initialize()
                # Refused by the endpoint (a width no model takes), after gradio_client has uploaded every photo.
                return await session.call_tool("generate", {"face_image": urls[0], "extra_face_images": urls[1:],
                                                            "prompt": "x", "width": 100, "height": 128, **FAST})

        return asyncio.run(run())

    def stored(photo: bytes) -> list[Path]:
        return [p for p in app.temp_dir.rglob("*.png") if p.stat().st_size == len(photo) and p.read_bytes() == photo]

    mine, others = noise_png(0), [noise_png(k) for k in range(1, MAX_PARKED_UPLOADS + 2)]
    assert send("203.0.113.7", [mine]).isError
    assert stored(mine), "the photo was not uploaded: nothing is tested"
    assert send("203.0.113.8", others).isError
    assert stored(mine), "another MCP client's photos deleted this client's"
    assert not stored(others[0]) and stored(others[1]), "the other client's own bound did not hold"


# --- the photo conversion, in process ------------------------------------------------------------------


def test_a_data_url_over_the_upload_limit_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    photos = _McpPhotos(max_bytes=1000, upload_dir=str(tmp_path))
    big = "data:image/png;base64," + base64.b64encode(b"x" * 3000).decode()
    with pytest.raises(ValueError, match=r"Invalid face_image: the photo is about 3 KB, over the 1 KB limit"):
        photos.convert({"face_image": big}, [["face_image"]])
    with pytest.raises(ValueError, match=r"Invalid person_1\[1\]: the data: URL's base64 data is not valid"):
        photos.convert({"person_1": ["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,***"]},
                       [["person_1", "items"]])
    assert len(list(tmp_path.iterdir())) == 1  # the valid first photo only: nothing written for a refused one


def test_photos_become_files_of_the_upload_folder(tmp_path: Path) -> None:
    photos = _McpPhotos(max_bytes=10**6, upload_dir=str(tmp_path))
    uploaded = tmp_path / "abc123" / "face.jpg"
    uploaded.parent.mkdir()
    uploaded.write_bytes((ASSETS / "astronaut.jpg").read_bytes())
    out = photos.convert(
        {"face_image": data_url(ASSETS / "astronaut.jpg"), "prompt": "x",
         "person_1": [f"https://someone.hf.space/gradio_api/file={uploaded}"]},
        [["face_image"], ["person_1", "items"]],
    )
    assert out["prompt"] == "x"
    stored = Path(out["face_image"]["path"])
    assert stored.is_relative_to(tmp_path) and stored.read_bytes() == (ASSETS / "astronaut.jpg").read_bytes()
    assert out["person_1"][0]["path"] == str(uploaded)
    outside = tmp_path.parent / "outside.jpg"
    outside.write_bytes(b"x")
    for url in (f"http://127.0.0.1/gradio_api/file={outside}", f"http://h/gradio_api/file={tmp_path}/../outside.jpg"):
        with pytest.raises(ValueError, match="is not the URL of a file uploaded to this app"):
            photos.convert({"face_image": url}, [["face_image"]])
