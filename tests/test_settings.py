"""Settings: every knob from the environment, validated once, with messages naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from instantid.errors import InvalidParameter, SettingsError, UserError
from instantid.request.requests import Request
from instantid.settings import Settings


def test_defaults_are_the_real_checkpoints() -> None:
    s = Settings.from_env({})
    assert s.preset == "real" and s.base_model == "wangqixun/YamerMIX_v8"
    assert s.instantid_repo == "InstantX/InstantID" and s.memory_profile == "auto"
    assert s.hub_cache is None and not s.hub_offline


def test_offline_keeps_the_users_models_and_tiny_runs_only_when_asked(tmp_path: Path) -> None:
    # Offline alone means "serve from the cache": the repos named (or the defaults) stay as they are.
    s = Settings.from_env({"HF_HUB_OFFLINE": "1", "INSTANTID_BASE_MODEL": "me/sdxl", "INSTANTID_REPO": "me/iid"})
    assert s.preset == "real" and s.hub_offline and (s.base_model, s.instantid_repo) == ("me/sdxl", "me/iid")
    assert Settings.from_env({"HF_HUB_OFFLINE": "1"}).base_model == "wangqixun/YamerMIX_v8"
    tiny = {"HF_HUB_OFFLINE": "1", "INSTANTID_PRESET": "tiny", "INSTANTID_TINY_CACHE": str(tmp_path)}
    s = Settings.from_env(tiny)
    assert s.preset == "tiny" and s.hub_cache == tmp_path and s.base_model.startswith("instantid-tiny/")
    assert s.face_models == str(tmp_path / "face-models")
    s = Settings.from_env({**tiny, "INSTANTID_FACE_MODELS": "/models/antelopev2"})
    assert s.face_models == "/models/antelopev2"
    # An explicit real preset stays real offline (checkpoints placed in the cache by hand).
    s = Settings.from_env({"HF_HUB_OFFLINE": "1", "INSTANTID_PRESET": "real", "HF_HUB_CACHE": str(tmp_path)})
    assert s.preset == "real" and s.hub_cache == tmp_path and s.hub_offline


def test_overrides() -> None:
    s = Settings.from_env(
        {"INSTANTID_BASE_MODEL": "me/sdxl", "INSTANTID_REPO": "me/iid", "INSTANTID_MEMORY_PROFILE": "Medium",
         "INSTANTID_CONTROLNET_CANNY": "me/canny", "INSTANTID_QUEUE_SIZE": "5", "GRADIO_MCP_SERVER": "true",
         "INSTANTID_ONNX_PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider", "HF_HOME": "/hf"}
    )
    assert (s.base_model, s.instantid_repo, s.memory_profile) == ("me/sdxl", "me/iid", "medium")
    assert s.controlnets["canny"] == "me/canny" and s.controlnets["pose"].startswith("thibaud/")
    assert s.queue_size == 5 and s.mcp_server
    assert s.onnx_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert s.hub_cache == Path("/hf/hub")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INSTANTID_PRESET": "huge"}, "INSTANTID_PRESET='huge'"),
        ({"INSTANTID_MEMORY_PROFILE": "xl"}, "INSTANTID_MEMORY_PROFILE='xl'"),
        ({"INSTANTID_QUEUE_SIZE": "0"}, "INSTANTID_QUEUE_SIZE=0 is out of range"),
        ({"INSTANTID_FACE_DET_SIZE": "big"}, "INSTANTID_FACE_DET_SIZE='big' is not an integer"),
        ({"INSTANTID_PRELOAD": "maybe"}, "INSTANTID_PRELOAD='maybe' is not a boolean"),
        ({"INSTANTID_ONNX_PROVIDERS": " , "}, "INSTANTID_ONNX_PROVIDERS is empty"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"num_images": 5}, "num_images"),
        ({"num_steps": 101}, "num_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"identitynet_strength": 1.6}, "identitynet_strength"),
        ({"adapter_strength": -0.1}, "adapter_strength"),
        ({"width": 512, "height": 0}, "width/height"),
        ({"width": 4160, "height": 1024}, "width"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**40}, "seed"),
        ({"style": "Cubism"}, "style"),
        ({"scheduler": "DDIM"}, "scheduler"),
        ({"controlnets": {"canny": 2.0}}, "controlnets[canny]"),
        ({"controlnets": {"lineart": 0.4}}, "controlnets"),
        ({"enable_lcm": True, "num_steps": 60}, "num_steps"),
    ],
)
def test_request_validation_names_parameter_and_range(kw: dict, name: str) -> None:
    kw = {"face_images": ["x.png"], **kw}
    with pytest.raises(InvalidParameter) as info:
        Request(**kw)
    assert info.value.name == name and str(info.value).startswith(f"Invalid {name}=")


def test_a_request_without_a_photo_says_what_to_do() -> None:
    with pytest.raises(UserError, match="No face photo: add a photo of the person's face"):
        Request(face_images=[])


def test_request_automatic_values_stay_open_for_the_engine() -> None:
    """0 and None both mean "automatic": the engine fills them per mode and profile (LCM: 5 steps, 1.5)."""
    for value in (None, 0):
        r = Request(face_images=["x"], num_steps=value, guidance_scale=value)
        assert (r.num_steps, r.guidance_scale, r.seed) == (None, None, None)
    assert Request(face_images=["x"], seed=0).seed == 0, "seed 0 is a seed"
    r = Request(face_images=["x"], num_steps=8, guidance_scale=2, seed=5, controlnets=["canny"])
    assert (r.num_steps, r.guidance_scale, r.seed, r.controlnets) == (8, 2.0, 5, {"canny": 0.4})
