"""Load on the tiny preset: concurrent API clients against the real app, and memory over many requests.

Loopback only, bounded in count and time. The app runs with a queue of 4, so that eight clients at
once meet both outcomes a public Space gives: a result, or Gradio's clean "queue is full" refusal.
Nothing may be lost (every request gets one of the two), hang (every wait has a deadline) or fail in
any other way; afterwards the app still serves. The memory figure printed here is the one in docs/limits.md.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpcore
import httpx
import psutil
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError

from instantid.request.requests import Request
from tests import apprunner

CLIENTS = 8
REQUESTS_EACH = 3
QUEUE_SIZE = 4
REQUEST_TIMEOUT_S = 120
TOTAL_TIMEOUT_S = 300
SEQUENTIAL_REQUESTS = 50
MB = 2**20


@pytest.fixture(scope="module")
def busy_app(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path):
    app = apprunner.start_app(tmp_path_factory.mktemp("load-app"), tiny_cache, INSTANTID_QUEUE_SIZE=str(QUEUE_SIZE))
    try:
        yield app
    finally:
        app.stop()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow  # 53 generations in a row
def test_memory_is_stable_over_sequential_requests(tiny_engine, photos: dict[str, Path]) -> None:
    process = psutil.Process()
    faces = [str(photos["astronaut"]), str(photos["hanks"]), str(photos["group"])]

    def one(i: int) -> None:
        request = Request(face_images=[faces[i % 3]], prompt=f"portrait number {i}", num_steps=1, seed=i)
        assert len(tiny_engine.run(request).images) == 1

    for i in range(3):  # warm-up: first-call allocations, caches, lazily built schedulers
        one(i)
    gc.collect()
    before = process.memory_info().rss
    samples = []
    t0 = time.monotonic()
    for i in range(SEQUENTIAL_REQUESTS):
        one(i)
        if (i + 1) % 10 == 0:
            gc.collect()
            samples.append(process.memory_info().rss)
    growth = samples[-1] - before
    print(
        f"\nRSS over {SEQUENTIAL_REQUESTS} sequential tiny-preset requests ({time.monotonic() - t0:.1f} s): "
        f"{before / MB:.0f} MB -> {samples[-1] / MB:.0f} MB (growth {growth / MB:+.1f} MB; every 10: "
        f"{', '.join(f'{s / MB:.0f}' for s in samples)})"
    )
    # Generous on purpose (allocator noise must never fail CI); a leak of one image per request is far more.
    assert growth < 300 * MB


def test_concurrent_clients_every_request_answered(busy_app: apprunner.App, photos: dict[str, Path]) -> None:
    face = str(photos["astronaut"])
    # Warm the app up (the first request waits for the background model load).
    Client(busy_app.url, verbose=False).predict(handle_file(face), "warm-up", num_steps=1, seed=0, api_name="/generate")
    rss_before = rss(busy_app.proc.pid)

    outcomes: dict[tuple[int, int], tuple[str, Any]] = {}
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    transport_retries: list[str] = []

    def user(i: int) -> None:
        client = Client(busy_app.url, verbose=False)
        start.wait(timeout=60)
        for j in range(REQUESTS_EACH):
            seed = 1000 * i + j
            for attempt in range(2):
                try:
                    job = client.submit(handle_file(face), f"portrait {i}-{j}", num_steps=1, seed=seed,
                                        api_name="/generate")
                    gallery, used_seed, *_ = job.result(timeout=REQUEST_TIMEOUT_S)
                    valid = used_seed == seed and len(gallery) == 1 and Path(gallery[0]["image"]).is_file()
                    outcome: tuple[str, Any] = ("ok", valid)
                except QueueError as exc:
                    outcome = ("queue full", str(exc))
                except (httpx.RemoteProtocolError, httpcore.RemoteProtocolError) as exc:
                    # Seen once in a full-suite run (2026-11-27): the server closed a loopback connection
                    # before a response body ("received 0 bytes, expected 403"), not reproduced in 9 reruns,
                    # under load or not. A connection-level fault below the app: asked again once, and at
                    # most one such retry per run is tolerated (asserted below).
                    outcome = ("error", f"{type(exc).__name__}: {exc}")
                    with lock:
                        transport_retries.append(str(exc))
                    if attempt == 0:
                        continue
                except Exception as exc:  # anything else is reported by the assertions below
                    outcome = ("error", f"{type(exc).__name__}: {exc}")
                break
            with lock:
                outcomes[(i, j)] = outcome

    t0 = time.monotonic()
    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, TOTAL_TIMEOUT_S - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    hung = [t for t in threads if t.is_alive()]
    counts = Counter(kind for kind, _ in outcomes.values())
    print(
        f"\n{CLIENTS} clients x {REQUESTS_EACH} requests in {elapsed:.1f} s: {dict(counts)}; app RSS "
        f"{rss_before / MB:.0f} -> {rss(busy_app.proc.pid) / MB:.0f} MB"
    )

    assert not hung, f"{len(hung)} clients still waiting after {TOTAL_TIMEOUT_S} s"
    assert len(outcomes) == CLIENTS * REQUESTS_EACH, "every request gets an answer"
    errors = [v for kind, v in outcomes.values() if kind == "error"]
    assert not errors, errors
    assert len(transport_retries) <= 1, transport_retries
    assert all(ok for kind, ok in outcomes.values() if kind == "ok"), "each result is the one its client asked for"
    assert all("Queue is full" in msg for kind, msg in outcomes.values() if kind == "queue full")
    # The queue holds 4 and one request runs: the first five of the burst are always served.
    assert counts["ok"] >= QUEUE_SIZE + 1

    # ...and the app is still up and serving.
    client = Client(busy_app.url, verbose=False)
    gallery, seed, *_ = client.predict(handle_file(face), "after the storm", num_steps=1, seed=7, api_name="/generate")
    assert seed == 7 and len(gallery) == 1
    assert client.predict(api_name="/status")["state"]["phase"] == "ready"
    with pytest.raises(AppError, match="No face found"):
        client.predict(handle_file(str(photos["noface"])), "x", num_steps=1, api_name="/generate")
