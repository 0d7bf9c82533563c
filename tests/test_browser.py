"""The real app under the tiny preset in a real Chromium: upload, prompt, Generate, gallery, Status tab.

Uses the Debian Chromium at /usr/bin/chromium through playwright (never `playwright install`);
screenshots land in artifacts/ (gitignored).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import apprunner

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
FACE = ROOT / "assets" / "astronaut.jpg"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


@pytest.fixture(scope="module")
def app_url(tiny_app: apprunner.App) -> Iterator[str]:
    yield tiny_app.url  # the session's app (conftest), shared with the app and hardening tests


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, app_url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#generate-button").wait_for(timeout=60_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_generate_and_status_in_a_real_browser(page) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect

    page.locator("#face-image input[type=file]").set_input_files(str(FACE))
    expect(page.locator("#face-image img").first).to_be_visible(timeout=30_000)
    page.locator("#prompt textarea").fill("a knight in shining armour")

    # Advanced settings: the page shows the explicit defaults, and the LCM switch moves them (a cheap step).
    page.get_by_text("Advanced settings").click()
    steps = page.get_by_role("spinbutton", name="Steps")
    guidance = page.get_by_role("spinbutton", name="Guidance scale")
    expect(steps).to_have_value("30", timeout=10_000)
    expect(guidance).to_have_value("5")
    page.get_by_label("LCM fast mode").check()
    expect(steps).to_have_value("5", timeout=10_000)
    expect(guidance).to_have_value("1.5")
    page.get_by_label("LCM fast mode").uncheck()
    expect(steps).to_have_value("30", timeout=10_000)
    # Fewer steps keep the tiny preset quick on a small CPU.
    steps.fill("3")
    steps.press("Enter")
    page.get_by_label("Randomize seed").first.uncheck()
    seed = page.locator("#seed input")
    seed.fill("777")
    seed.press("Tab")

    page.locator("#generate-button").click()
    image = page.locator("#gallery img").first
    expect(image).to_be_visible(timeout=120_000)
    expect(seed).to_have_value("777")
    # Similarity in the caption, the timings as one line (the raw JSON stays in the API).
    expect(page.locator("#run-summary")).to_contain_text(re.compile(r"Done in [\d.]+ (ms|s): faces"), timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)

    page.get_by_role("tab", name="Status").click()
    memory = page.locator("#memory-table")
    expect(memory).to_contain_text(re.compile(r"\d+\.\d\d GiB"), timeout=30_000)
    expect(memory).to_contain_text("Process RSS")
    expect(page.locator("#load-state")).to_contain_text("ready", timeout=30_000)
    expect(page.locator("#components")).to_contain_text("unet", timeout=30_000)
    page.locator("#refresh-status").click()
    expect(memory).to_contain_text("GiB")
    page.screenshot(path=str(ARTIFACTS / "browser-status.png"), full_page=True)


def test_example_fills_the_inputs_and_is_generated_once(page) -> None:
    expect = sync_api.expect
    page.get_by_text("a detective in a trench coat under a street lamp").click()
    expect(page.locator("#prompt textarea")).to_have_value("a detective in a trench coat under a street lamp")
    expect(page.locator("#face-image img").first).to_be_visible(timeout=30_000)
    # Lazily cached: the first click generates the example with the default settings and shows it.
    expect(page.locator("#gallery img").first).to_be_visible(timeout=120_000)
    page.get_by_text("Advanced settings").click()
    expect(page.locator("#seed input")).to_have_value("42", timeout=10_000)


def test_a_bad_seed_typed_in_the_page_gets_its_message(page) -> None:
    """A seed of -5 used to do nothing (a 500 in the console); the page must say what is wrong."""
    expect = sync_api.expect
    page.locator("#face-image input[type=file]").set_input_files(str(FACE))
    expect(page.locator("#face-image img").first).to_be_visible(timeout=30_000)
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Randomize seed").first.uncheck()
    seed = page.locator("#seed input")
    seed.fill("-5")
    seed.press("Tab")
    page.locator("#generate-button").click()
    expect(page.get_by_text(re.compile(r"Invalid seed=-5: must be an integer in 0\.\.2147483647"))).to_be_visible(
        timeout=30_000
    )
    expect(page.locator("#gallery img")).to_have_count(0)


def test_face_swap_in_a_real_browser(page) -> None:
    """The mode choice shows the swap's inputs and examples only; Shift+Enter in the prompt runs the mode shown
    (the prompt box has two lines, so Enter alone starts a new line); the swap fills the before/after view."""
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect
    target = ROOT / "assets" / "astronaut.jpg"
    expect(page.locator("#target-image")).to_be_hidden()
    page.get_by_label("Face swap").check()
    expect(page.locator("#target-image")).to_be_visible(timeout=10_000)
    expect(page.locator("#generate-button")).to_be_hidden()
    expect(page.locator("#source-image")).to_be_hidden()
    expect(page.get_by_text("Face swap examples")).to_be_visible()
    expect(page.get_by_text("Generate examples")).to_be_hidden()

    page.locator("#face-image input[type=file]").set_input_files(str(FACE))
    page.locator("#target-image input[type=file]").set_input_files(str(target))
    expect(page.locator("#target-image img").first).to_be_visible(timeout=30_000)
    page.get_by_text("Advanced settings").click()
    steps = page.get_by_role("spinbutton", name="Steps")
    steps.fill("2")
    steps.press("Enter")

    prompt = page.locator("#prompt textarea")
    prompt.fill("a smiling woman")
    prompt.press("Shift+Enter")
    expect(page.locator("#gallery img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#before-after img").first).to_be_visible(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-swap.png"), full_page=True)

    # A swap example (two people in one photo, face 0 replaced) fills the swap's inputs and shows its result
    # with the run's summary line, generated on this first click.
    shown = {name: page.locator(f"#{name} img").first.get_attribute("src") for name in ("gallery", "before-after")}
    page.get_by_text("an elderly officer").click()
    expect(page.locator("#prompt textarea")).to_have_value("an elderly officer", timeout=30_000)
    expect(page.get_by_role("spinbutton", name="Face to replace (0 = largest)")).to_have_value("0")
    for name, src in shown.items():
        expect(page.locator(f"#{name} img").first).not_to_have_attribute("src", src or "", timeout=120_000)
    expect(page.locator("#run-summary")).to_contain_text("paste")
