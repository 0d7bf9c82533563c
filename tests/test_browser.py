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
    # The page's load step has run (it sets this flag): before it, on a slow machine, a value typed into a box
    # was overwritten when the app finished mounting (CI: Steps 1000 became 0 and a run started).
    page.wait_for_function("() => window.__instantidKeepTypedNumbers === true", timeout=60_000)
    # And its other load steps have answered (each mode's estimate): a test starts from a settled page. (A typed
    # Steps lost late in a long suite was not theirs: test_a_number_typed_as_its_accordion_first_opens_holds.)
    page.wait_for_load_state("networkidle", timeout=60_000)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _upload_face(page, photo: Path = FACE) -> None:
    """Upload the face photo and wait for its thumbnail (the page has read it)."""
    page.locator("#face-image input[type=file]").set_input_files(str(photo))
    sync_api.expect(page.locator("#face-image img").first).to_be_visible(timeout=30_000)


def _type_number(page, label: str, value: str) -> None:
    """Type `value` into the number box labelled `label` and see it hold for a second, typed once (late in a long
    suite a typed Width or Steps used to go back to 0: see test_a_number_typed_as_its_accordion_first_opens_holds)."""
    box = page.get_by_role("spinbutton", name=label)
    box.fill(value)
    box.press("Enter")
    page.wait_for_timeout(1000)
    assert box.input_value() == value, f"{label}: {value} typed, {box.input_value()} a second later"


# Types `value` into the box labelled `label` at the first animation frame the page asks for after the box appears
# (the accordion holding it opened for the first time), just before the page's own callbacks of that frame run; as a
# visitor's typing reaches the page: the value, then an input event.
TYPE_IN_FIRST_FRAME_JS = r"""([label, value]) => {
    const setValue = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
    const frame = window.requestAnimationFrame;
    window.__typedInFirstFrame = false;
    new MutationObserver((_, observer) => {
        const box = document.querySelector(`input[aria-label="number input for ${label}"]`);
        if (!box) return;
        observer.disconnect();
        window.requestAnimationFrame = (callback) => frame.call(window, (time) => {
            if (!window.__typedInFirstFrame) {
                window.requestAnimationFrame = frame;
                setValue.call(box, value);
                box.dispatchEvent(new Event('input', {bubbles: true}));
                window.__typedInFirstFrame = true;
            }
            callback(time);
        });
    }).observe(document.body, {subtree: true, childList: true});
}"""


def test_generate_and_status_in_a_real_browser(page) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect

    _upload_face(page)
    page.locator("#prompt textarea").fill("a knight in shining armour")

    # Advanced settings: steps and guidance are "automatic" (0), as in the API, so that the server's profile
    # chooses them (the page used to send 30 and 5: the cpu profile's 20 steps never applied); the LCM switch
    # (a cheap step) goes back to automatic.
    page.get_by_text("Advanced settings").click()
    steps = page.get_by_role("spinbutton", name="Steps")
    guidance = page.get_by_role("spinbutton", name="Guidance scale")
    page.wait_for_timeout(1000)  # what a page-load step would have written by now
    expect(steps).to_have_value("0", timeout=10_000)
    expect(guidance).to_have_value("0")
    steps.fill("12")
    # A speed, like LCM, puts them back to automatic: each speed runs its own steps and guidance.
    page.get_by_label("turbo", exact=True).check()
    expect(steps).to_have_value("0", timeout=10_000)
    steps.fill("12")
    page.get_by_label("LCM fast mode").check()
    expect(steps).to_have_value("0", timeout=10_000)
    expect(guidance).to_have_value("0")
    page.get_by_label("LCM fast mode").uncheck()
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
    # A lone result's caption lies inside the gallery's visible box (it used to sit below its bottom edge).
    caption = page.locator("#gallery .caption-label").first
    expect(caption).to_contain_text("seed 777")
    shown = page.locator("#gallery .grid-wrap").bounding_box()
    box = caption.bounding_box()
    assert shown and box and shown["y"] <= box["y"] and box["y"] + box["height"] <= shown["y"] + shown["height"], (
        shown, box)
    page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)

    # Another mode: its own labels, and the last mode's results leave the screen.
    page.get_by_label("Restyle").check()
    expect(page.locator("#gallery img")).to_have_count(0, timeout=10_000)
    expect(page.locator("#run-summary")).to_have_text("")
    accordion = page.get_by_role("button", name=re.compile("^More photos"))
    expect(accordion).to_contain_text("More photos of the same person")
    expect(page.get_by_text("Extra ControlNets (from the photo to restyle)", exact=True)).to_be_visible()
    page.get_by_label("Generate", exact=True).check()
    expect(accordion).to_contain_text("More photos and a pose reference", timeout=10_000)

    page.get_by_role("tab", name="Status").click()
    memory = page.locator("#memory-table")
    expect(memory).to_contain_text(re.compile(r"\d+\.\d\d GiB"), timeout=30_000)
    expect(memory).to_contain_text("Process RSS")
    expect(page.locator("#load-state")).to_contain_text("ready", timeout=30_000)
    expect(page.locator("#load-state")).not_to_contain_text("ready — ready")
    expect(page.locator("#components")).to_contain_text("unet", timeout=30_000)
    # The run was a turbo one: its LoRA was loaded for it (lazily: the tiny preset is not resident).
    expect(page.locator("#components")).to_contain_text("turbo_lora")
    # Every header cell of the memory table says something; the plot's legend is titled, not "series".
    headers = memory.locator("th").all_inner_texts()
    assert headers and all(h.strip() for h in headers), headers
    expect(page.locator("#memory-plot svg g.role-legend")).to_contain_text("process RSS", timeout=30_000)
    expect(page.get_by_text("series", exact=True)).to_have_count(0)
    page.locator("#refresh-status").click()
    expect(memory).to_contain_text("GiB")
    page.screenshot(path=str(ARTIFACTS / "browser-status.png"), full_page=True)


# The x axis's tick labels of the memory chart (Gradio draws it with Vega as SVG): its seconds, 0 = newest.
X_TICKS_JS = """() => {
    const axis = [...document.querySelectorAll('#memory-plot svg g.role-axis')]
        .find(g => (g.getAttribute('aria-label') || '').startsWith('X-axis'));
    if (!axis) return null;
    return [...axis.querySelectorAll('.role-axis-label text')]
        .map(t => parseFloat(t.textContent.replace('\u2212', '-')));
}"""


def _oldest_second_shown(page) -> float:
    """How far back the memory chart reaches, read once it is drawn (no retry: its first drawing is the point)."""
    sync_api.expect(page.locator("#memory-table")).to_contain_text("GiB", timeout=30_000)
    page.wait_for_function(f"({X_TICKS_JS})() && ({X_TICKS_JS})().length > 0", timeout=30_000)
    ticks = page.evaluate(X_TICKS_JS)
    return min(ticks)


def test_the_memory_chart_shows_the_server_s_history(page, browser, app_url: str) -> None:
    """The history was a per-session gr.State sampled only while the Status tab was open: a reload or another
    visitor started the chart again from one point. The server samples it now; every visitor reads it."""
    page.get_by_role("tab", name="Status").click()
    # The server has sampled for at least 8 s by now (this visitor's tab polls meanwhile; the old page did too).
    page.wait_for_function(f"(({X_TICKS_JS})() || [0]).some(x => x <= -8)", timeout=60_000)
    other = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        fresh = other.new_page()
        fresh.goto(app_url, wait_until="domcontentloaded")
        fresh.locator("#generate-button").wait_for(timeout=60_000)
        fresh.get_by_role("tab", name="Status").click()
        assert _oldest_second_shown(fresh) <= -8, "a new visitor's chart started again from one point"
        # Away and back: still the whole history.
        fresh.get_by_role("tab", name="Create").click()
        fresh.get_by_role("tab", name="Status").click()
        assert _oldest_second_shown(fresh) <= -8
    finally:
        other.close()


def test_example_fills_the_inputs_and_is_generated_once(page) -> None:
    """Its first click showed no step progress (Gradio's lazy cache generated it outside the event); later clicks
    show it again from memory, and say so instead of "Done in"."""
    expect = sync_api.expect
    page.evaluate(r"""() => {
        window.__steps = false;
        window.__watch = setInterval(() => {
            const line = document.querySelector('#run-progress');
            if (line && /Step \d+ of \d+/.test(line.textContent)) window.__steps = true;
            const caption = document.querySelector('#gallery .caption-label');
            if (caption && caption.textContent.startsWith("seed")) clearInterval(window.__watch);
        }, 50);
    }""")
    page.get_by_text("a detective in a trench coat under a street lamp").click()
    expect(page.locator("#prompt textarea")).to_have_value("a detective in a trench coat under a street lamp")
    expect(page.locator("#face-image img").first).to_be_visible(timeout=30_000)
    # The first click generates the example with the default settings, showing its steps like the button's run.
    expect(page.locator("#gallery .caption-label").first).to_contain_text("seed", timeout=300_000)
    assert page.evaluate("() => window.__steps"), "the example's first run showed no step progress"
    expect(page.locator("#run-summary")).to_contain_text(re.compile(r"Done in [\d.]+ (ms|s): faces"), timeout=30_000)
    page.get_by_text("Advanced settings").click()
    # The seed box keeps its start (the default, none, which Gradio's number box shows as 0): the example ran
    # with a random seed of its own, not one the page drew into the box.
    expect(page.locator("#seed input")).to_have_value("0", timeout=10_000)
    # Shown again on later clicks, in far less than it took: it says so instead of "Done in".
    page.get_by_label("Restyle").check()  # clears the results, so the next ones are the second click's
    page.get_by_label("Generate", exact=True).check()
    expect(page.locator("#gallery img")).to_have_count(0, timeout=10_000)
    page.get_by_text("a detective in a trench coat under a street lamp").click()
    expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
    expect(page.locator("#run-summary")).to_contain_text(
        re.compile(r"Example shown from the cache; first generated in [\d.]+ (ms|s): faces"), timeout=30_000
    )


def test_a_bad_seed_typed_in_the_page_gets_its_message(page) -> None:
    """A seed of -5 used to do nothing (a 500 in the console); the page must say what is wrong."""
    expect = sync_api.expect
    _upload_face(page)
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Randomize seed").first.uncheck()
    seed = page.locator("#seed input")
    seed.fill("-5")
    seed.press("Tab")
    page.locator("#generate-button").click()
    expect(page.get_by_text("Seed must be an integer in 0..2147483647 (you gave -5).")).to_be_visible(timeout=30_000)
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
        expect(page.locator(f"#{name} img").first).not_to_have_attribute("src", src or "", timeout=300_000)
    expect(page.locator("#run-summary")).to_contain_text("paste")


def test_group_portrait_in_a_real_browser(page) -> None:
    """Group mode on the page: its own inputs and example; the example (two people on the two-person photo's
    layout, refined by default) runs and its captions score each person by name."""
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect
    page.get_by_label("Group", exact=True).check()
    expect(page.locator("#group-button")).to_be_visible(timeout=10_000)
    expect(page.locator("#face-image")).to_be_hidden()
    expect(page.get_by_text("Group examples")).to_be_visible()
    page.get_by_text("two friends laughing at a café table, film photo").click()
    expect(page.locator("#prompt textarea")).to_have_value("two friends laughing at a café table, film photo",
                                                           timeout=30_000)
    expect(page.locator("#gallery img").first).to_be_visible(timeout=300_000)
    caption = page.locator("#gallery .caption-label").first
    expect(caption).to_contain_text(re.compile(r"seed \d+: Eileen .*, Grace "), timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-group.png"), full_page=True)


def test_a_run_locks_its_controls_and_keeps_its_progress_bar(page) -> None:
    """A second click during a run drew a seed into the Seed box that no run used, and the button stayed
    enabled; the Results panel showed the progress bar a third of the time and an empty placeholder the rest
    (each heartbeat's yield reached the page as "generating", drawn without a bar). Sampled from the first
    step shown to the result: the page's progress line (with its bar) must be there in every sample."""
    expect = sync_api.expect
    _upload_face(page)
    page.get_by_text("Advanced settings").click()
    # A run of seconds (10 steps at 512 px): a run of a few tenths (3 steps) could start and end between two of
    # expect's polls, and the lock was never seen (CI, late in the suite).
    for name, value in (("Width", "512"), ("Height", "512"), ("Steps", "10")):
        _type_number(page, name, value)
    seed = page.locator("#seed input")
    button = page.locator("#generate-button")
    page.evaluate(r"""() => {
        window.__bar = [];
        window.__locked = false;
        window.__sampler = setInterval(() => {
            const line = document.querySelector('#run-progress');
            const shown = !!(line && line.querySelector('progress') && /Step \d+ of/.test(line.textContent));
            const caption = document.querySelector('#gallery .caption-label');
            const swap = [...document.querySelectorAll('#mode input')].find(i => i.value === 'Face swap');
            if (document.querySelector('#generate-button').disabled && swap && swap.disabled) window.__locked = true;
            if (caption && caption.textContent.startsWith("seed")) { clearInterval(window.__sampler); return; }
            if (window.__bar.length || shown) window.__bar.push(shown);
        }, 50);
    }""")
    button.click()
    # Seen by the page itself every 50 ms: the run button and the mode choice off while the run is in flight.
    page.wait_for_function("() => window.__locked", timeout=30_000)
    shown_seed = seed.input_value()
    # Shift+Enter in the prompt presses the shown button: nothing happens while it is off.
    page.locator("#prompt textarea").press("Shift+Enter")
    expect(page.locator("#gallery img").first).to_be_visible(timeout=300_000)
    expect(button).to_be_enabled(timeout=30_000)
    expect(seed).to_have_value(shown_seed)
    expect(page.locator("#gallery .caption-label").first).to_contain_text(f"seed {shown_seed}")
    samples = page.evaluate("() => window.__bar")
    # From the first step shown to the last (the line goes with the result, which may land between two looks).
    last = len(samples) - samples[::-1].index(True)
    assert last >= 10, samples
    assert samples[:last].count(False) == 0, f"no progress line in {samples[:last].count(False)} of {last} samples"


def test_a_run_shows_steady_progress_and_a_live_preview(page) -> None:
    """A tester's 38 s Group run: Gradio's timer in the Results box cycled 0.0-0.6 s, its overlay vanished 6 times
    mid-run, and nothing of the image was seen until the end. Sampled every 50 ms from the first step shown to the
    result of a run of several seconds: the progress line is always there, its step i of n never goes back and
    reaches n, its seconds never go back and grow, and a preview shows in the gallery before the result."""
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect
    _upload_face(page)
    page.get_by_text("Advanced settings").click()
    # The most steps the page takes: a run of seconds even on a quiet machine (about 2 s alone on 2 cores).
    _type_number(page, "Steps", "100")
    page.evaluate("""() => {
        window.__samples = [];
        window.__sampler = setInterval(() => {
            const line = document.querySelector('#run-progress');
            const box = line ? line.getBoundingClientRect() : null;
            const caption = document.querySelector('#gallery .caption-label');
            const sample = {text: line ? line.textContent.trim() : "", shown: !!(box && box.height > 0),
                            caption: caption ? caption.textContent : "",
                            image: !!document.querySelector('#gallery img')};
            if (window.__samples.length || /Step \\d+ of/.test(sample.text)) window.__samples.push(sample);
            if (sample.caption.startsWith("seed")) clearInterval(window.__sampler);
        }, 50);
    }""")
    page.locator("#generate-button").click()
    preview = page.locator("#gallery .caption-label").first
    expect(preview).to_contain_text("preview, step", timeout=300_000)
    page.screenshot(path=str(ARTIFACTS / "browser-progress.png"), full_page=True)
    expect(page.locator("#gallery .caption-label").first).to_contain_text("seed", timeout=300_000)
    expect(page.locator("#run-progress")).to_have_text("", timeout=30_000)  # gone with the result
    samples = page.evaluate("() => window.__samples")
    # From the first step shown to the last: the line goes with the result, which may land between two looks.
    stepping = [i for i, s in enumerate(samples) if re.match(r"Step \d+ of", s["text"])]
    running = samples[: stepping[-1] + 1]
    assert len(running) >= 10, running
    parsed = []
    for s in running:
        found = re.fullmatch(r"Step (\d+) of 100 · ([\d.]+) s", s["text"])
        assert found and s["shown"], f"the progress line went away mid-run: {s}"
        parsed.append((int(found[1]), float(found[2])))
    done, seconds = [p[0] for p in parsed], [p[1] for p in parsed]
    # Sampled, so the last steps may pass between two looks.
    assert done == sorted(done) and len(set(done)) >= 5 and done[-1] >= 50, done
    assert seconds == sorted(seconds) and seconds[-1] - seconds[0] >= 0.5, seconds
    previews = [s for s in running if s["caption"].startswith("preview, step") and s["image"]]
    assert previews, "no preview before the result"


def test_a_failed_run_leaves_no_progress_behind(page, tmp_path: Path) -> None:
    """A photo without a face fails after the run has started (the progress line says so): the error shows and the
    line goes, rather than staying at "Starting" as if the run went on."""
    expect = sync_api.expect
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("RGB", (256, 256), (120, 160, 200)).save(blank)
    page.evaluate("""() => {
        window.__lines = [];
        window.__watch = setInterval(() => {
            const line = document.querySelector('#run-progress');
            if (line && line.textContent.trim()) window.__lines.push(line.textContent.trim());
        }, 20);
    }""")
    _upload_face(page, blank)
    page.locator("#generate-button").click()
    expect(page.get_by_text(re.compile(r"No face found in the face photo"))).to_be_visible(timeout=60_000)
    expect(page.locator("#run-progress")).to_have_text("", timeout=10_000)
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)
    lines = page.evaluate("() => window.__lines")
    # Sampled: a run that fails at once may show its first line between two looks.
    assert all(re.fullmatch(r"(Starting|Loading the models) · [\d.]+ s", line) for line in lines), lines


def test_a_number_typed_as_its_accordion_first_opens_holds(page) -> None:
    """Late in the whole suite a typed Width or Steps was back at 0 within a second, one run in two (always the
    first number typed after opening Advanced settings). Gradio 6.31 draws a closed accordion's inputs on its first
    opening and, a few frames later, sets them to the page's config (gradio_adapter's KEEP_TYPED_NUMBERS_JS says
    how): on a busy machine Playwright typed in between. Typed in the box's first animation frame, Width went back
    to 0 every time (10 of 10); the number holds now, in the box and in Gradio's value (the slider beside it)."""
    page.evaluate(TYPE_IN_FIRST_FRAME_JS, ["Width", "512"])
    page.get_by_text("Advanced settings").click()
    page.wait_for_function("() => window.__typedInFirstFrame", timeout=30_000)
    page.wait_for_timeout(1000)
    assert page.get_by_role("spinbutton", name="Width").input_value() == "512"
    assert page.get_by_role("slider", name="range slider for Width").input_value() == "512"


def test_out_of_range_numbers_are_refused_not_clamped(page) -> None:
    """A slider's box clamped a typed number when it lost focus: Steps 1000 ran 100 steps, face index 150 became
    99. The page sends what was typed and says what is wrong, as the API does, after a mode switch too (an
    input the mode choice updated lost its checks); the button comes back on."""
    expect = sync_api.expect
    _upload_face(page)
    page.get_by_text("Advanced settings").click()
    steps = page.get_by_role("spinbutton", name="Steps")
    steps.fill("1000")
    expect(steps).to_have_value("1000")
    page.locator("#generate-button").click()  # the box loses focus here
    # In the page's words: the field as labelled (the API's refusal names num_steps: see the test below).
    expect(page.get_by_text("Steps must be an integer in 0..100 (you gave 1000).")).to_be_visible(timeout=30_000)
    expect(steps).to_have_value("1000")
    expect(page.locator("#gallery img")).to_have_count(0)
    expect(page.locator("#generate-button")).to_be_enabled(timeout=30_000)

    steps.fill("2")
    page.get_by_label("Face swap").check()
    index = page.get_by_role("spinbutton", name="Face to replace (0 = largest)")
    index.fill("150")
    page.locator("#swap-button").click()
    expect(page.get_by_text("Face to replace must be an integer in 0..99 (you gave 150).")).to_be_visible(
        timeout=30_000)
    expect(index).to_have_value("150")
    expect(page.locator("#swap-button")).to_be_enabled(timeout=30_000)


# --- the page as visitors meet it: a phone, the Status tab's tables, hints true for this server -------------

PHONE = {"width": 390, "height": 844}
# Every word in the Status tab's table cells that the browser drew on more than one line ("Reque st").
BROKEN_WORDS_JS = r"""() => {
    const tables = ['#load-state', '#memory-table', '#profile', '#components'].map((id) => `${id} table`).join(', ');
    const cells = [...document.querySelectorAll(tables)].flatMap((table) => [...table.querySelectorAll('td, th')])
        .filter((cell) => cell.offsetParent !== null);
    const broken = [];
    for (const cell of cells) {
        const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (const word of node.textContent.matchAll(/\S+/g)) {
                const range = document.createRange();
                range.setStart(node, word.index);
                range.setEnd(node, word.index + word[0].length);
                const rects = [...range.getClientRects()].filter((r) => r.width > 0);
                const lines = new Set(rects.map((r) => Math.round(r.top)));
                if (lines.size > 1) broken.push(word[0]);
            }
        }
    }
    return {cells: cells.length, broken};
}"""
DOCUMENT_WIDTH_JS = "() => document.documentElement.scrollWidth"


def _status_drawn(page) -> None:
    """The Status tab opened and drawn: its tables, its chart's legend."""
    page.get_by_role("tab", name="Status").click()
    sync_api.expect(page.locator("#memory-table")).to_contain_text("GiB", timeout=30_000)
    sync_api.expect(page.locator("#components")).to_contain_text("unet", timeout=30_000)
    sync_api.expect(page.locator("#memory-plot svg g.role-legend")).to_contain_text("process RSS", timeout=30_000)


def test_a_phone_sees_the_inputs_first_and_never_scrolls_sideways(browser, app_url: str) -> None:
    """At 390 x 844 the Status tab was 508 px wide, the first screen was all introduction, and "Use via API"
    was missing from the footer (Gradio hides it on narrow screens)."""
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect
    context = browser.new_context(viewport=PHONE)
    try:
        page = context.new_page()
        page.goto(app_url, wait_until="domcontentloaded")
        page.locator("#generate-button").wait_for(timeout=60_000)
        expect(page.locator("#face-image img, #face-image button").first).to_be_visible(timeout=30_000)
        page.wait_for_timeout(500)  # the fonts and the layout settled
        assert page.evaluate(DOCUMENT_WIDTH_JS) <= PHONE["width"]
        # The first screen holds the inputs: the face photo and the prompt, whole.
        for selector in ("#face-image", "#prompt textarea"):
            box = page.locator(selector).bounding_box()
            assert box and box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], (selector, box)
        # The tab holding the four modes is named for them, not after one of them.
        expect(page.get_by_role("tab", name="Create")).to_be_visible()
        expect(page.get_by_role("tab", name="Generate")).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "browser-phone.png"))
        # "Use via API": in the introduction and in the footer, and it opens the API page.
        expect(page.locator("#intro").get_by_role("link", name="Use via API")).to_be_visible()
        footer_api = page.locator("footer").get_by_role("button", name=re.compile("Use via API"))
        footer_api.scroll_into_view_if_needed()
        expect(footer_api).to_be_visible()
        footer_api.click()
        expect(page.get_by_role("dialog", name="Use via API")).to_be_visible(timeout=30_000)
        expect(page.get_by_role("dialog", name="Use via API")).to_contain_text("generate", timeout=30_000)

        page.goto(app_url, wait_until="domcontentloaded")
        page.locator("#generate-button").wait_for(timeout=60_000)
        _status_drawn(page)
        page.wait_for_timeout(500)
        assert page.evaluate(DOCUMENT_WIDTH_JS) <= PHONE["width"]
        page.screenshot(path=str(ARTIFACTS / "browser-phone-status.png"), full_page=True)
    finally:
        context.close()


def test_status_tables_keep_their_words_whole_and_the_legend_names_the_series(page, app_url: str) -> None:
    """On a desktop the GPU-time table broke words ("Reque st", "genera te", "0.01 6") and the chart's legend
    showed only its title, "Measure"."""
    from gradio_client import Client, handle_file

    ARTIFACTS.mkdir(exist_ok=True)
    # One request at least, so that the GPU-time table has rows (as after the tests above; alone too).
    Client(app_url, verbose=False).predict(handle_file(str(FACE)), "a knight", num_steps=2, api_name="/generate")
    _status_drawn(page)
    sync_api.expect(page.locator("#profile table")).to_contain_text("generate", timeout=30_000)
    page.wait_for_timeout(500)
    found = page.evaluate(BROKEN_WORDS_JS)
    assert found["cells"] > 20 and not found["broken"], found
    # The legend names the series and has no title ("series", "Measure").
    legend = page.locator("#memory-plot svg g.role-legend").text_content() or ""
    assert "process RSS" in legend and "Measure" not in legend and "series" not in legend, legend
    sync_api.expect(page.locator("#profile")).to_contain_text("last 10 requests at most, newest first")
    page.screenshot(path=str(ARTIFACTS / "browser-status-desktop.png"), full_page=True)


def test_the_hints_are_true_for_this_server(page, app_url: str) -> None:
    """The speed hint said "quality: 30 steps" where the cpu profile runs 20, the image slider offered 4 where
    the profile makes 2, and nothing said what Group costs."""
    from gradio_client import Client

    from instantid.declaration import SPEEDS
    from instantid.models.memory import PROFILES

    expect = sync_api.expect
    report = Client(app_url, verbose=False).predict(api_name="/status")
    profile = PROFILES[report["profile"]["name"]]
    quality = profile.default_steps or SPEEDS["quality"].steps
    expect(page.locator("#speed")).to_contain_text(f"quality: {quality} steps; fast: {SPEEDS['fast'].steps} steps")
    expect(page.locator("#speed")).to_contain_text(re.compile(r"fast: \d+ steps, ~\d+ % of the time"))
    slider = page.locator("#num-images input[type=range]")
    expect(slider).to_have_attribute("max", str(profile.max_images))
    page.get_by_text("Advanced settings").click()
    expect(page.get_by_text(f"{quality} quality, {SPEEDS['fast'].steps} fast")).to_be_visible()
    expect(page.locator("#group-note")).to_be_hidden()
    page.get_by_label("Group", exact=True).check()
    expect(page.locator("#group-note")).to_contain_text("one Generate per person", timeout=10_000)


def test_the_api_keeps_the_parameter_names_the_page_words_with_labels(app_url: str) -> None:
    """The page's refusal names the field as labelled ("Steps must be ...", the test above); gradio_client's
    names the parameter it sent."""
    from gradio_client import Client, handle_file

    with pytest.raises(Exception, match=r"Invalid num_steps=1000: must be an integer in 0\.\.100") as refused:
        Client(app_url, verbose=False).predict(handle_file(str(FACE)), "x", num_steps=1000, api_name="/generate")
    assert "Steps must" not in str(refused.value)


def test_group_photos_show_as_pictures(page) -> None:
    """Each person's photos were a list of file names, and the example's layout photo was set inside a closed
    accordion, unseen."""
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect
    page.get_by_label("Group", exact=True).check()
    expect(page.locator("#group-button")).to_be_visible(timeout=10_000)
    expect(page.locator("#layout-image")).to_be_hidden()
    page.get_by_text("two friends laughing at a café table, film photo").click()
    for person in (1, 2):
        expect(page.locator(f"#person-{person}-preview img").first).to_be_visible(timeout=30_000)
    expect(page.locator("#layout-image img").first).to_be_visible(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "browser-group-photos.png"), full_page=True)
    expect(page.locator("#gallery img").first).to_be_visible(timeout=300_000)  # its run ends within the test


def test_framing_and_head_angle_on_a_phone(browser, app_url: str) -> None:
    """Composition without a pose photo, at 390 x 844: the framing choice and the head angle sit right under the
    prompt in Generate and leave with Restyle; full body shows the face layout on a model face before the run,
    its estimate names the face it refines, and its run refines it; a pose photo takes the preview away."""
    ARTIFACTS.mkdir(exist_ok=True)
    expect = sync_api.expect
    context = browser.new_context(viewport=PHONE)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(app_url, wait_until="domcontentloaded")
        page.locator("#generate-button").wait_for(timeout=60_000)
        page.wait_for_function("() => window.__instantidKeepTypedNumbers === true", timeout=60_000)
        block, preview = page.locator("#composition"), page.locator("#layout-preview")
        full_body, angle = block.get_by_label("full body"), page.get_by_role("combobox", name="Head angle")
        expect(full_body).to_be_visible()
        expect(angle).to_be_visible()
        prompt_box, block_box = page.locator("#prompt").bounding_box(), block.bounding_box()
        assert prompt_box and block_box
        gap = block_box["y"] - (prompt_box["y"] + prompt_box["height"])
        assert 0 <= gap <= 40 and block_box["x"] + block_box["width"] <= PHONE["width"], (prompt_box, block_box)
        expect(preview).to_be_hidden()
        page.get_by_label("Restyle").check()
        expect(block).to_be_hidden(timeout=10_000)
        # Group places its people with them too; its examples table (five columns) scrolls in its own box, as
        # Generate's does now that it shows framing and head angle (the page was 948 px wide).
        page.get_by_label("Group", exact=True).check()
        expect(block).to_be_visible(timeout=10_000)
        expect(page.get_by_text("Group examples")).to_be_visible()
        page.wait_for_timeout(500)  # the table drawn
        assert page.evaluate(DOCUMENT_WIDTH_JS) <= PHONE["width"]
        page.get_by_label("Generate", exact=True).check()
        expect(block).to_be_visible(timeout=10_000)

        _upload_face(page)
        page.locator("#prompt textarea").fill("a woman walking in a park, full body")
        full_body.check()
        caption = page.locator("#layout-preview-caption")
        expect(page.locator("#layout-preview-image img")).to_be_visible(timeout=10_000)
        # The tiny preset's canvas: 128 px short side.
        expect(caption).to_contain_text("Face layout of this run (full body, 128x192), shown on a model face: your "
                                        "photo's own face proportions replace the model face's.")
        angle.click()
        page.get_by_role("option", name="left", exact=True).click()
        expect(caption).to_contain_text("(full body, head angle left, 128x192)", timeout=10_000)
        expect(page.get_by_role("option", name="left", exact=True)).to_be_hidden()
        assert page.evaluate(DOCUMENT_WIDTH_JS) <= PHONE["width"]
        page.screenshot(path=str(ARTIFACTS / "browser-framing-phone.png"), full_page=True)

        page.get_by_text("Advanced settings").click()
        steps = page.get_by_role("spinbutton", name="Steps")
        steps.fill("2")
        steps.press("Enter")
        page.locator("#generate-button").click()
        expect(page.locator("#gallery .caption-label").first).to_contain_text("refined: the face", timeout=300_000)

        # Priced from the run just observed: full body's refined face is named; the photo's framing has none.
        estimate = page.locator("#generate-estimate")
        block.get_by_label("photo", exact=True).check()
        expect(estimate).to_contain_text("expected on this hardware", timeout=10_000)
        expect(estimate).not_to_contain_text("refined")
        expect(caption).to_contain_text("The face keeps the place and size it has in your photo.")
        full_body.check()
        expect(estimate).to_contain_text("Includes 1 refined face (one more render).", timeout=10_000)

        # A pose photo sets the layout: no preview, nothing refined.
        page.get_by_role("button", name=re.compile("^More photos")).click()
        page.locator("#pose-image input[type=file]").set_input_files(str(FACE))
        expect(preview).to_be_hidden(timeout=10_000)
        expect(estimate).not_to_contain_text("refined", timeout=10_000)
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
