"""The engine and pipeline on the tiny preset: the InstantID method's switches each do what they say."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import pytest

from instantid.errors import InvalidParameter, NoFaceError
from instantid.request.requests import Request


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def run(engine, photos, **kw):
    kw.setdefault("face_images", [photos["astronaut"]])
    kw.setdefault("prompt", "a portrait")
    kw.setdefault("num_steps", 2)
    kw.setdefault("seed", 7)
    return engine.run(Request(**kw))


def test_result_fields(tiny_engine, photos) -> None:
    r = run(tiny_engine, photos, num_images=2)
    assert len(r.images) == 2 and len(r.similarities) == 2
    assert r.images[0].size == (r.width, r.height) == r.keypoint_image.size
    assert r.width % 64 == 0 and r.height % 64 == 0 and min(r.width, r.height) == 128  # tiny preset short side
    assert r.seed == 7 and r.num_steps == 2 and r.guidance_scale == 5.0 and r.faces_found == 1
    assert {"faces_ms", "encode_ms", "denoise_ms", "decode_ms", "identity_check_ms", "total_ms"} <= set(r.timings_ms)
    # The tiny models paint noise: no face in the output, so no similarity rather than a made-up number.
    assert all(s is None or -1 <= s <= 1 for s in r.similarities)


def test_each_image_of_a_run_is_its_own_seeds_image(tiny_engine, photos) -> None:
    """Image 2 of a run with seed 7 is the image of seed 8 (its caption says so): it can be made again alone."""
    two = run(tiny_engine, photos, num_images=2)
    second = run(tiny_engine, photos, seed=8)
    first, other = pixels(two)
    assert np.abs(other - pixels(second)[0]).max() <= 2  # batched and single maths may round apart
    assert not np.array_equal(first, other)


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_engine, photos) -> None:
    a, b = run(tiny_engine, photos), run(tiny_engine, photos)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(run(tiny_engine, photos, seed=8)))


@pytest.mark.parametrize(
    "change",
    [
        {"adapter_strength": 0.0},
        {"identitynet_strength": 0.0},
        {"enhance_face_region": False},
        {"face_images_extra": "hanks"},
        {"pose_image": "group"},
        {"scheduler": "DPMSolverMultistepScheduler-Karras"},
        {"controlnets": {"canny": 0.8}},
        {"controlnets": {"depth": 0.5}},
        {"prompt": "a painting of a dragon"},
    ],
)
def test_each_switch_changes_the_output(tiny_engine, photos, change: dict) -> None:
    base = pixels(run(tiny_engine, photos))
    kw = dict(change)
    if "face_images_extra" in kw:
        kw = {"face_images": [photos["astronaut"], photos[kw.pop("face_images_extra")]]}
    if "pose_image" in kw:
        kw["pose_image"] = photos[kw["pose_image"]]
    changed = run(tiny_engine, photos, **kw)
    other = pixels(changed)
    assert other.shape != base.shape or not np.array_equal(base, other)
    # ...and the engine is left clean: the default request gives the default pixels again.
    assert np.array_equal(base, pixels(run(tiny_engine, photos)))


def test_lcm_toggle(tiny_engine, photos) -> None:
    off = pixels(run(tiny_engine, photos, num_steps=2, guidance_scale=1.5))
    on = run(tiny_engine, photos, enable_lcm=True, num_steps=None)
    assert on.num_steps == 5 and on.guidance_scale == 1.5  # LCM's defaults
    assert "lcm" in tiny_engine.loras.names
    on2 = pixels(run(tiny_engine, photos, enable_lcm=True, num_steps=2))
    assert not np.array_equal(off, on2)
    assert np.array_equal(off, pixels(run(tiny_engine, photos, num_steps=2, guidance_scale=1.5)))


def test_several_faces_use_the_largest_and_say_so(tiny_engine, photos) -> None:
    r = run(tiny_engine, photos, face_images=[photos["group"]])
    assert r.faces_found == 6
    assert any("6 faces" in w for w in r.warnings)


def test_embedding_averaging(tiny_engine, photos) -> None:
    from instantid.vision import faces
    from instantid.vision.images import image_to_array, load_image

    analyzer = tiny_engine.faces()
    embs = []
    for key in ("astronaut", "hanks"):
        img, _ = load_image(photos[key], max_bytes=10**8, max_pixels=10**8)
        embs.append(analyzer.embed_largest(image_to_array(img))[0].embedding)
    avg = faces.average_embedding(embs)
    np.testing.assert_allclose(avg, (embs[0] + embs[1]) / 2, rtol=1e-6)


def test_user_errors(tiny_engine, photos) -> None:
    with pytest.raises(NoFaceError, match="face"):
        run(tiny_engine, photos, face_images=[photos["noface"]])
    with pytest.raises(NoFaceError, match="pose photo"):
        run(tiny_engine, photos, pose_image=photos["noface"])
    with pytest.raises(InvalidParameter, match=r"num_steps=0\.5"):
        run(tiny_engine, photos, num_steps=0.5)
    with pytest.raises(InvalidParameter, match="controlnets"):
        run(tiny_engine, photos, controlnets={"sketch": 1.0})
    # ...and the engine still serves the next request.
    assert run(tiny_engine, photos).images


def test_progress_and_interrupt(tiny_engine, photos) -> None:
    seen: list[tuple[int, int]] = []
    r = tiny_engine.run(
        Request(face_images=[photos["astronaut"]], num_steps=3, seed=1),
        progress=lambda i, n: seen.append((i, n)),
    )
    assert seen[-3:] == [(1, 3), (2, 3), (3, 3)]
    assert r.warnings and "Empty prompt" in r.warnings[0]

    class Cancelled(Exception):
        pass

    def cancel(i: int, n: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        tiny_engine.run(Request(face_images=[photos["astronaut"]], num_steps=3), progress=cancel)
    assert run(tiny_engine, photos).images  # not poisoned


def test_three_stages_are_generate_and_their_hand_overs_pickle(tiny_engine, photos) -> None:
    """prepare -> render -> finish (ZeroGPU's split, across a process boundary) gives generate's pixels."""
    import pickle

    from instantid.request.requests import Rendered, Step

    request = Request(face_images=[photos["astronaut"]], prompt="a portrait", num_steps=2, seed=7,
                              controlnets={"canny": 0.4, "depth": 0.4})
    job = pickle.loads(pickle.dumps(tiny_engine.prepare(request)))
    assert job.seed == 7 and set(job.controls) == {"canny", "depth"} and job.face_mask.shape == (job.height, job.width)
    events = list(tiny_engine.render_steps(job))
    assert events[:-1] == [Step(1, 2), Step(2, 2)] and isinstance(events[-1], Rendered)
    rendered = pickle.loads(pickle.dumps(events[-1]))
    staged = tiny_engine.finish(job, rendered)
    assert np.array_equal(pixels(staged), pixels(tiny_engine.run(request)))


def test_closing_the_gpu_stage_stops_it_at_the_next_step(tiny_engine, photos) -> None:
    job = tiny_engine.prepare(Request(face_images=[photos["astronaut"]], num_steps=50, seed=1))
    steps = tiny_engine.render_steps(job)
    assert next(steps).done == 1
    steps.close()  # returns once the pipeline thread has stopped: the next request finds the pipeline free
    assert tiny_engine._gen_lock.acquire(blocking=False)
    tiny_engine._gen_lock.release()
    assert run(tiny_engine, photos).images


def test_two_concurrent_first_requests_load_once(tiny_settings, photos, monkeypatch) -> None:
    import instantid.engine as engine_mod

    calls = []
    real = engine_mod.load_pipeline

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "load_pipeline", counting)
    engine = engine_mod.Engine(tiny_settings)
    results, errors = [], []

    def go() -> None:
        try:
            results.append(run(engine, photos))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2 and calls == [1]
    assert engine.state["phase"] == "ready"
    assert np.array_equal(pixels(results[0]), pixels(results[1]))


def test_a_cpu_machine_short_of_ram_loads_and_runs_in_bfloat16(tiny_settings, photos) -> None:
    """16 GiB and no GPU (HF's free CPU basic): the real-model path chooses bfloat16 and every mode runs."""
    from dataclasses import replace

    from instantid.engine import Engine
    from instantid.models.memory import GIB, probe_hardware

    cpu_basic = replace(probe_hardware(), cuda=False, zerogpu=False, host_total_bytes=16 * GIB)
    # The tiny checkpoints served as real ones: the host-RAM rules apply as to real models.
    engine = Engine(replace(tiny_settings, preset="real"), hardware=cpu_basic)
    assert engine.profile.dtype == "bfloat16" and "-> bfloat16 weights" in engine.profile_reason
    face, target = str(photos["astronaut"]), str(photos["group"])
    for mode, extra in (("generate", {}), ("restyle", {"source_image": face}), ("swap", {"target_image": target})):
        result = engine.run(Request(face_images=[face], prompt="a portrait", num_steps=2, mode=mode,
                                                 **extra))
        assert len(result.images) == 1 and np.asarray(result.images[0]).std() > 0, mode
    dtypes = {c["name"]: c["dtype"] for c in engine.report()["components"]}
    assert {dtypes[n] for n in ("unet", "identitynet", "vae", "text_encoder", "text_encoder_2")} == {"bfloat16"}


def test_report_is_json_ready(tiny_engine) -> None:
    import json

    report = json.loads(json.dumps(tiny_engine.report()))
    assert {"host", "gpu", "components", "profile", "state"} <= set(report)
    names = {c["name"] for c in report["components"]}
    assert {"unet", "identitynet", "resampler", "vae", "text_encoder", "text_encoder_2"} <= names
    assert report["state"]["phase"] == "ready" and report["profile"]["name"] == "cpu"


def test_save_pretrained_keeps_the_resampler(tiny_engine, tmp_path: Path) -> None:
    tiny_engine.pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "resampler" / "config.json").exists()
    assert (tmp_path / "saved" / "resampler" / "diffusion_pytorch_model.safetensors").exists()


def test_ip_adapter_bin_and_safetensors_load_the_same(tmp_path: Path, tiny_cache: Path) -> None:
    """ip-adapter.bin is read with weights_only; a safetensors file with prefixed keys gives the same weights."""
    import torch
    from safetensors.torch import save_file

    from instantid.models.loading import load_ip_adapter_file

    bin_path = next(tiny_cache.glob("models--instantid-tiny--InstantID/snapshots/*/ip-adapter.bin"))
    image_proj, ip = load_ip_adapter_file(bin_path)
    flat = {f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in ip.items()})
    save_file(flat, tmp_path / "ip-adapter.safetensors")
    image_proj2, ip2 = load_ip_adapter_file(tmp_path / "ip-adapter.safetensors")
    assert image_proj2.keys() == image_proj.keys() and ip2.keys() == ip.keys()
    assert all(torch.equal(image_proj[k], image_proj2[k]) for k in image_proj)
    assert all(torch.equal(ip[k], ip2[k]) for k in ip)


def test_weight_format_is_judged_by_the_diffusers_names(tmp_path: Path) -> None:
    """A stray single-file .safetensors beside a diffusers .bin must not make from_pretrained look for safetensors."""
    from diffusers import ControlNetModel

    from instantid.models.loading import _from_pretrained
    from instantid.models.tiny import ModelShape, build_controlnet, build_unet

    shape = ModelShape.tiny()
    build_controlnet(build_unet(shape), shape, seed=1).save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "OpenPoseXL2.safetensors").write_bytes(b"not loaded")
    net = _from_pretrained(ControlNetModel, tmp_path, None, None)
    assert isinstance(net, ControlNetModel)


def test_chosen_size_keeps_the_face_proportions(tiny_engine, photos) -> None:
    """A size with another aspect than the photo crops the layout; the face is not stretched."""

    def shape_ratio(result) -> float:
        img = np.asarray(result.keypoint_image).astype(int)

        def centre(rgb: tuple[int, int, int]) -> np.ndarray:
            return np.argwhere((img == rgb).all(axis=2)).mean(axis=0)  # (y, x) of the point's disc

        left_eye, right_eye = centre((255, 0, 0)), centre((0, 255, 0))
        mouth = (centre((255, 255, 0)) + centre((255, 0, 255))) / 2
        eyes = (left_eye + right_eye) / 2
        return abs(right_eye[1] - left_eye[1]) / abs(mouth[0] - eyes[0])

    square = run(tiny_engine, photos, width=256, height=256)  # the astronaut photo is square
    wide = run(tiny_engine, photos, width=512, height=256)
    # Stretching to 2:1 would double the eye distance against the eye-mouth height; cropping keeps it.
    assert shape_ratio(wide) == pytest.approx(shape_ratio(square), rel=0.1)


def test_the_cpu_profile_default_steps_apply_only_when_automatic(tiny_engine, photos) -> None:
    assert tiny_engine.profile.name == "cpu" and tiny_engine.profile.default_steps == 20
    face = [photos["astronaut"]]
    assert tiny_engine.prepare(Request(face_images=face)).num_steps == 20
    assert tiny_engine.prepare(Request(face_images=face, num_steps=30)).num_steps == 30
    assert tiny_engine.prepare(Request(face_images=face, enable_lcm=True)).num_steps == 5


def test_the_scheduler_names_the_api_offers_are_the_pipeline_s() -> None:
    """requests.py names them without importing diffusers (the UI must not pull torch in); the pipeline
    builds them: the two lists must not drift apart."""
    from instantid.declaration import SCHEDULERS, SPEEDS
    from instantid.models.pipeline import SCHEDULER_FACTORIES

    # Besides the offered ones, each speed's own sampler (LCM's included), which no request names.
    assert set(SCHEDULER_FACTORIES) == {*SCHEDULERS, *(s.scheduler for s in SPEEDS.values() if s.scheduler)}


# --- restyle (img2img) and face swap (inpaint) --------------------------------------------------------


def decoded(path) -> np.ndarray:
    from instantid.vision.images import load_image

    image, _ = load_image(path, max_bytes=10**8, max_pixels=10**8)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# Each mode's own photo input, the photo these tests give it, and their default steps.
MODE_DEFAULTS = {"swap": ("target_image", "group", 2), "restyle": ("source_image", "hanks", 10)}


def in_mode(mode, engine, photos, **kw):
    field, photo, steps = MODE_DEFAULTS[mode]
    kw.setdefault("face_images", [photos["astronaut"]])
    kw.setdefault(field, photos[photo])
    kw.setdefault("num_steps", steps)
    kw.setdefault("seed", 7)
    return engine.run(Request(mode=mode, **kw))


swap = functools.partial(in_mode, "swap")
restyle = functools.partial(in_mode, "restyle")


def test_swap_keeps_every_pixel_outside_the_feathered_region(tiny_engine, photos) -> None:
    from instantid.vision import geometry

    target = decoded(photos["group"])
    result = swap(tiny_engine, photos, face_index=1)
    out = pixels(result)[0]
    assert out.shape == target.shape and (result.width, result.height) == (target.shape[1], target.shape[0])
    # The region, as the engine derives it: the target's second-largest face, its crop and feathered mask.
    face = tiny_engine.analyze(photos["group"])[1]
    x1, y1, x2, y2 = geometry.swap_crop((target.shape[1], target.shape[0]), face.bbox)
    local = face.bbox - np.array([x1, y1, x1, y1])
    region = np.zeros(target.shape[:2], dtype=np.float32)
    region[y1:y2, x1:x2] = geometry.swap_region((x2 - x1, y2 - y1), local)
    assert np.array_equal(out[region == 0], target[region == 0])
    core = region == 1.0  # inside the face: the tiny models paint noise, nothing like the photo
    assert core.sum() > 100 and np.abs(out[core] - target[core]).mean() > 10


def test_swap_identity_seed_and_face_choice(tiny_engine, photos) -> None:
    base = pixels(swap(tiny_engine, photos))
    assert np.array_equal(base, pixels(swap(tiny_engine, photos)))  # same seed, same pixels
    other = pixels(swap(tiny_engine, photos, face_images=[photos["hanks"]]))
    changed = np.any(base != other, axis=-1)
    # Another identity redraws the face region, and only there: the rest is the target's in both.
    assert changed.any() and np.array_equal(base[~changed], other[~changed])
    largest, second = base, pixels(swap(tiny_engine, photos, face_index=1))
    moved = np.argwhere(np.any(largest != second, axis=-1))
    assert len(moved) > 0


def test_swap_scores_the_face_it_swapped_not_the_largest(tiny_engine, photos) -> None:
    """The caption's identity score is the redrawn face's. A stand-in render gives the crop back as it was, so the
    swapped face (face_index=1) is the target's own second face: it scores high against its own embedding and
    low against the untouched largest face's, which the score once measured instead."""
    import dataclasses

    from instantid.request.requests import Rendered

    group = decoded(photos["group"]).astype(np.uint8)
    found = tiny_engine.faces().detect(group)
    job = tiny_engine.prepare(Request(face_images=[photos["astronaut"]], mode="swap",
                                              target_image=photos["group"], face_index=1, num_steps=2, seed=3))
    rendered = Rendered(images=[job.init_image], timings_ms={})
    own = tiny_engine.finish(dataclasses.replace(job, embedding=found[1].embedding), rendered).similarities[0]
    largest = tiny_engine.finish(dataclasses.replace(job, embedding=found[0].embedding), rendered).similarities[0]
    assert own is not None and own > 0.8, own
    assert largest is None or largest < 0.5, largest
    # A real swap on the tiny preset paints noise where the face was: no face there, so no score at all.
    assert swap(tiny_engine, photos, face_index=1).similarities == [None]


def test_swap_refusals(tiny_engine, photos) -> None:
    with pytest.raises(NoFaceError, match="No face found in the photo to swap a face into"):
        swap(tiny_engine, photos, target_image=photos["noface"])
    with pytest.raises(InvalidParameter, match=r"face_index=6: the photo has 6 face\(s\): use 0..5"):
        swap(tiny_engine, photos, face_index=6)
    with pytest.raises(InvalidParameter, match="face_index"):
        swap(tiny_engine, photos, face_index=-1)
    from instantid.errors import UserError

    with pytest.raises(UserError, match="photo to swap a face into"):
        Request(face_images=[photos["astronaut"]], mode="swap")
    with pytest.raises(InvalidParameter, match="width=128: is not used by swap"):
        swap(tiny_engine, photos, width=128, height=128)


def test_a_long_strip_s_face_is_found_by_generate_and_swap(tiny_engine, photos, tmp_path) -> None:
    """A 7999 x 401 strip (the uploads allow 20:1) holding a tight portrait, a face of about 210 x 290 px: both
    modes once said "No face found"."""
    from PIL import Image

    canvas = Image.new("RGB", (7999, 401), (128, 128, 128))
    canvas.paste(Image.open(photos["hanks"]).convert("RGB").resize((300, 300), Image.Resampling.LANCZOS), (4000, 50))
    strip = tmp_path / "strip.png"
    canvas.save(strip)
    assert run(tiny_engine, photos, face_images=[strip]).faces_found == 1
    result = swap(tiny_engine, photos, target_image=strip)
    out, target = pixels(result)[0], decoded(strip)
    changed = np.argwhere(np.any(out != target, axis=-1))
    assert out.shape == target.shape and len(changed) > 0
    assert changed[:, 1].min() >= 3900 and changed[:, 1].max() <= 4400  # around the face, nowhere else


def test_a_face_cut_by_the_edge_is_swapped_where_it_is_inside_the_photo(tiny_engine, photos, tmp_path) -> None:
    """The detector sees only the part of a face inside the photo (its box ends at the edge, measured: 10 to 50 %
    cut), so a cut face is swapped by that part, as docs/limits.md says; the crop never leaves the photo."""
    from PIL import Image

    astronaut = decoded(photos["astronaut"]).astype(np.uint8)
    x1, _, x2, _ = tiny_engine.analyze(photos["astronaut"])[0].bbox
    cut = astronaut[:, int(x1 + 0.3 * (x2 - x1)):]  # 30 % of the face box left of the photo
    path = tmp_path / "cut.png"
    Image.fromarray(cut).save(path)
    face = tiny_engine.analyze(path)[0]
    assert face.bbox[0] < 2  # the box stops at the edge: how much lies outside is not known
    out = pixels(swap(tiny_engine, photos, target_image=path))[0]
    changed = np.argwhere(np.any(out != cut, axis=-1))
    assert len(changed) > 0 and changed[:, 1].min() == 0 and changed[:, 1].max() < face.bbox[2] + face.width


def test_restyle_strength_is_how_far_from_the_source(tiny_engine, photos) -> None:
    """Measured in latent space: the tiny preset's random VAE does not give back the photo it encodes, so
    pixels cannot show closeness; the latents the denoising ends on can, against the source's own latents."""
    import torch

    pipe = tiny_engine.pipes["img2img"]

    def distance(strength: float) -> float:
        job = tiny_engine.prepare(Request(face_images=[photos["astronaut"]], mode="restyle",
                                                  source_image=photos["hanks"], num_steps=10, strength=strength))
        assert job.init_image.size == (job.width, job.height) and job.denoising_steps == int(10 * strength)
        last: dict[str, torch.Tensor] = {}

        def keep(p, i, t, kw):
            last["latents"] = kw["latents"]
            return {}

        pipe(job.prompt, job.negative_prompt, face_embedding=job.embedding, keypoint_image=job.keypoint_image,
             height=job.height, width=job.width, num_inference_steps=10, image=job.init_image, strength=strength,
             generator=torch.Generator().manual_seed(7), callback_on_step_end=keep)
        with torch.no_grad():
            x = pipe.image_processor.preprocess(job.init_image).to(pipe.vae.dtype)
            source = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
        return float((last["latents"] - source).abs().mean())

    near, middle, far = distance(0.1), distance(0.5), distance(1.0)
    assert near < middle < far and far > 10 * near, (near, middle, far)
    low = restyle(tiny_engine, photos, strength=0.1)
    assert np.array_equal(pixels(low), pixels(restyle(tiny_engine, photos, strength=0.1)))  # same seed
    assert not np.array_equal(pixels(low), pixels(restyle(tiny_engine, photos, strength=0.1, seed=8)))


def test_restyle_face_layout_from_the_source_or_else_the_identity(tiny_engine, photos) -> None:
    own = restyle(tiny_engine, photos, num_steps=2)
    assert not any("No face in the photo to restyle" in w for w in own.warnings)
    faceless = restyle(tiny_engine, photos, source_image=photos["noface"], num_steps=2)
    assert any("No face in the photo to restyle" in w for w in faceless.warnings)
    assert faceless.images[0].size == (128, 128)  # the face-free photo is square
    with pytest.raises(InvalidParameter, match="strength=0.05: runs no step of 10"):
        restyle(tiny_engine, photos, strength=0.05)


def test_mode_pipelines_share_the_modules_and_the_memory(tiny_engine) -> None:
    base = tiny_engine.pipe
    assert tiny_engine.pipes["base"] is base
    for kind in ("img2img", "inpaint"):
        pipe = tiny_engine.pipes[kind]
        assert pipe is not base
        for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "resampler"):
            assert getattr(pipe, name) is getattr(base, name)
    names = [c["name"] for c in tiny_engine.report()["components"]]
    assert len(names) == len(set(names))  # counted once: the report walks the one set of modules


def test_a_swap_job_pickles_without_its_target(tiny_engine, photos) -> None:
    """ZeroGPU pickles the job into its worker: the target photo stays in the main process, where finish uses it."""
    import pickle

    job = tiny_engine.prepare(Request(face_images=[photos["astronaut"]], mode="swap",
                                              target_image=photos["group"], num_steps=2, seed=3))
    sent = pickle.loads(pickle.dumps(job))
    assert sent.paste is None and job.paste is not None
    assert sent.mask_image.size == sent.init_image.size == (sent.width, sent.height)
    rendered = tiny_engine.render(sent)
    assert np.array_equal(pixels(tiny_engine.finish(job, rendered)), pixels(swap(tiny_engine, photos, seed=3)))


def test_restyle_and_swap_encode_in_the_vae_s_own_dtype(tiny_settings, photos) -> None:
    """The profiles give the VAE its own dtype (bf16 beside an fp16 UNet on ZeroGPU): the photo diffusers
    encodes must reach it in that dtype, and the VAE must keep it, flagged force_upcast or not."""
    import torch

    from instantid.engine import Engine

    engine = Engine(tiny_settings)
    engine.ensure_loaded()
    vae = engine.pipe.vae
    vae.to(torch.bfloat16)
    for upcast in (False, True):
        vae.register_to_config(force_upcast=upcast)
        assert restyle(engine, photos, num_steps=2, strength=1.0).images
        assert swap(engine, photos).images
        assert vae.dtype == torch.bfloat16 and vae.config.force_upcast is upcast


# --- every declared parameter reaches the job ----------------------------------------------------------------

PAIR = str(Path(__file__).resolve().parents[1] / "assets" / "two_people.jpg")


def _reaches(photos) -> dict[str, tuple[str, dict, str, dict]]:
    """Per parameter: (mode, the value(s) it is changed to, the `Job` field that must change, what the mode's
    base request needs besides)."""
    hanks, astronaut = str(photos["hanks"]), str(photos["astronaut"])
    more = {"person_3": [hanks]}
    return {
        "face_image": ("generate", {"face_image": hanks}, "embedding", {}),
        "source_image": ("restyle", {"source_image": astronaut}, "init_image", {}),
        "target_image": ("swap", {"target_image": PAIR}, "init_image", {}),
        "person_1": ("group", {"person_1": [str(photos["group"])]}, "embeddings", {}),
        "person_2": ("group", {"person_2": [astronaut]}, "embeddings", {}),
        "prompt": ("generate", {"prompt": "a knight"}, "prompt", {}),
        "extra_face_images": ("generate", {"extra_face_images": [hanks]}, "embedding", {}),
        "person_3": ("group", more, "people", {}),
        "person_4": ("group", {"person_4": [astronaut]}, "people", more),
        "names": ("group", {"names": "Ada, Ben"}, "people", {}),
        "layout_image": ("group", {"layout_image": PAIR}, "keypoint_image", {}),
        "order": ("group", {"order": "2,1"}, "group", {}),
        "pose_image": ("generate", {"pose_image": hanks}, "keypoint_image", {}),
        "negative_prompt": ("generate", {"negative_prompt": "blurry"}, "negative_prompt", {}),
        "style": ("generate", {"style": "Neon"}, "prompt", {}),
        "num_images": ("generate", {"num_images": 2}, "num_images", {}),
        "width": ("generate", {"width": 256, "height": 128}, "width", {}),
        "height": ("generate", {"width": 128, "height": 256}, "height", {}),
        "strength": ("restyle", {"strength": 0.5}, "strength", {}),
        "face_index": ("swap", {"face_index": 1}, "init_image", {}),
        "num_steps": ("generate", {"num_steps": 7}, "num_steps", {}),
        "guidance_scale": ("generate", {"guidance_scale": 3.0}, "guidance_scale", {}),
        "identitynet_strength": ("generate", {"identitynet_strength": 1.0}, "identitynet_strength", {}),
        "adapter_strength": ("generate", {"adapter_strength": 1.0}, "adapter_strength", {}),
        "controlnets": ("generate", {"controlnets": {"canny": 0.5}}, "controls", {}),
        "scheduler": ("generate", {"scheduler": "DEISMultistepScheduler"}, "scheduler", {}),
        "speed": ("generate", {"speed": "turbo"}, "speed", {}),
        "enable_lcm": ("generate", {"enable_lcm": True}, "speed", {}),
        "seed": ("generate", {"seed": 5}, "seed", {}),
        "randomize_seed": ("generate", {"randomize_seed": True}, "seed", {}),
        "enhance_face_region": ("generate", {"enhance_face_region": False}, "face_mask", {}),
        # t1.jpg's faces are small: laid out by it, both people's faces are refined by default (test_refine).
        "refine_faces": ("group", {"refine_faces": "off"}, "refine", {"layout_image": str(photos["group"])}),
        "framing": ("generate", {"framing": "portrait"}, "keypoint_image", {}),
        "head_angle": ("generate", {"head_angle": "left"}, "keypoint_image", {}),
        "head_yaw": ("group", {"head_yaw": 20}, "group", {}),
        "head_pitch": ("generate", {"head_pitch": -15}, "keypoint_image", {}),
    }


def test_every_declared_parameter_reaches_the_job(tiny_engine, photos) -> None:
    """Each parameter, changed alone through the API's path (`from_api`), changes what the GPU stage is given: a
    declaration that nothing consumes (or a new one without its line here) fails."""
    import pickle

    from instantid.declaration import PARAMS

    bases = {
        "generate": {"face_image": str(photos["astronaut"])},
        "restyle": {"face_image": str(photos["astronaut"]), "source_image": str(photos["hanks"])},
        "swap": {"face_image": str(photos["astronaut"]), "target_image": str(photos["group"])},
        "group": {"person_1": [str(photos["astronaut"])], "person_2": [str(photos["hanks"])]},
    }
    reaches = _reaches(photos)
    assert set(reaches) == set(PARAMS), "a parameter without its line here: say which job field it changes"

    def job(mode: str, **values):
        return tiny_engine.prepare(Request.from_api({**bases[mode], "prompt": "", "seed": 1, **values}, mode))

    for name, (mode, changed, field, extra) in reaches.items():
        assert mode in PARAMS[name].modes, name
        before, after = job(mode, **extra), job(mode, **extra, **changed)
        assert pickle.dumps(getattr(before, field)) != pickle.dumps(getattr(after, field)), f"{name} -> {field}"
    # No seed given: the engine draws one per request.
    seeds = {tiny_engine.prepare(Request.from_api({**bases["generate"], "prompt": ""})).seed for _ in range(3)}
    assert len(seeds) > 1
