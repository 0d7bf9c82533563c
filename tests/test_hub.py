"""Checkpoint resolution through a hand-built Hugging Face cache, offline, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from instantid.errors import CheckpointError
from instantid.models.hub import (
    RepoRef,
    choose_weights,
    face_model_files,
    fetch,
    fetch_component,
    is_published,
    list_files,
    publish_folder,
    resolve_face_models,
)


@pytest.mark.parametrize(
    ("files", "folder", "expected"),
    [
        # fp16 safetensors win; the full-precision copy and the .bin are never fetched.
        (
            [
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.bin",
                "unet/config.json",
            ],
            "unet",
            ["unet/diffusion_pytorch_model.fp16.safetensors"],
        ),
        (
            ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"],
            "unet",
            ["unet/diffusion_pytorch_model.safetensors"],
        ),
        # Sharded: the shards and their index, same variant only.
        (
            [
                "text_encoder_2/model.fp16-00001-of-00002.safetensors",
                "text_encoder_2/model.fp16-00002-of-00002.safetensors",
                "text_encoder_2/model.safetensors.index.fp16.json",
                "text_encoder_2/model-00001-of-00002.safetensors",
                "text_encoder_2/model.safetensors.index.json",
            ],
            "text_encoder_2",
            [
                "text_encoder_2/model.fp16-00001-of-00002.safetensors",
                "text_encoder_2/model.fp16-00002-of-00002.safetensors",
            ],
        ),
        (
            ["ControlNetModel/diffusion_pytorch_model.safetensors", "ControlNetModel/config.json", "ip-adapter.bin"],
            "ControlNetModel",
            ["ControlNetModel/diffusion_pytorch_model.safetensors"],
        ),
        (["diffusion_pytorch_model.bin", "config.json"], "", ["diffusion_pytorch_model.bin"]),
        (["vae/config.json"], "vae", []),
    ],
)
def test_choose_weights_picks_one_format(files: list[str], folder: str, expected: list[str]) -> None:
    chosen = choose_weights(files, folder)
    assert [c for c in chosen if not c.endswith(".json")] == expected


def test_repo_ref_parse() -> None:
    assert RepoRef.parse("InstantX/InstantID") == RepoRef("InstantX/InstantID")
    assert RepoRef.parse("space:InstantX/InstantID/models/antelopev2") == RepoRef(
        "InstantX/InstantID", "space", "models/antelopev2"
    )
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        RepoRef.parse("justaname")


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "config.json").write_text("{}")
    (src / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"half")
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"full")
    (src / "model_index.json").write_text("{}")
    cache = tmp_path / "hub"
    publish_folder(cache, "acme/sdxl", src)
    return cache


def test_offline_listing_and_fetch_from_the_cache(cache: Path) -> None:
    repo = RepoRef("acme/sdxl")
    assert is_published(cache, "acme/sdxl", marker="model_index.json")
    files = list_files(repo, cache_dir=cache, offline=True)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    path = fetch(repo, "model_index.json", cache_dir=cache, offline=True)
    assert path.read_text() == "{}" and "snapshots" in str(path)
    folder, variant = fetch_component(repo, "unet", files=files, cache_dir=cache, offline=True)
    assert variant == "fp16"
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").read_bytes() == b"half"


def test_missing_repo_and_file_name_them(cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'acme/nothing'.*not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        list_files(RepoRef("acme/nothing"), cache_dir=cache, offline=True)
    with pytest.raises(CheckpointError, match=r"'unet/missing.bin' from 'acme/sdxl'"):
        fetch(RepoRef("acme/sdxl"), "unet/missing.bin", cache_dir=cache, offline=True)


def test_face_models_from_a_folder_or_a_space_repo(tmp_path: Path, face_models_dir: Path) -> None:
    assert resolve_face_models(str(face_models_dir), cache_dir=None, offline=True) == face_models_dir
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_face_models(str(tmp_path / "nope"), cache_dir=None, offline=True)
    # The official Space layout: models/antelopev2/ beside other files; only det + rec are fetched.
    src = tmp_path / "space"
    (src / "models" / "antelopev2").mkdir(parents=True)
    for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"):
        (src / "models" / "antelopev2" / name).write_bytes((face_models_dir / name).read_bytes())
    for unused in ("genderage.onnx", "2d106det.onnx", "1k3d68.onnx"):  # antelopev2's other models
        (src / "models" / "antelopev2" / unused).write_bytes(b"unused")
    (src / "app.py").write_text("")
    cache = tmp_path / "hub"
    publish_folder(cache, "acme/space", src, repo_type="space")
    folder = resolve_face_models("space:acme/space/models/antelopev2", cache_dir=cache, offline=True)
    assert (folder / "scrfd_500m_bnkps.onnx").is_file() and (folder / "w600k_mbf.onnx").is_file()
    repo = RepoRef.parse("space:acme/space/models/antelopev2")
    # "2d106det" is a landmark model despite the "det" in its name: never fetched.
    assert face_model_files(repo, list_files(repo, cache_dir=cache, offline=True)) == [
        "models/antelopev2/scrfd_500m_bnkps.onnx",
        "models/antelopev2/w600k_mbf.onnx",
    ]


def test_preload_plan_is_what_the_resident_start_up_fetches(tiny_settings, monkeypatch) -> None:
    """`python -m instantid preload` names exactly the files `load_all` fetches: no more, no fewer."""
    import dataclasses

    import instantid.engine as engine_mod
    import instantid.models.hub as hub_mod
    import instantid.models.loading as loading_mod
    from instantid.frontends.cli import preload_yaml

    fetched: set[tuple[str, str]] = set()
    real_fetch = hub_mod.fetch

    def recording_fetch(repo: RepoRef, filename: str, **kw):  # a spy, the real fetch runs
        fetched.add((repo.repo_id, filename))
        return real_fetch(repo, filename, **kw)

    monkeypatch.setattr(hub_mod, "fetch", recording_fetch)
    monkeypatch.setattr(loading_mod, "fetch", recording_fetch)
    # The wheel's face models as a repo in the cache, as the real preset fetches antelopev2 from a repo.
    face_repo = "acme/face-models"
    publish_folder(tiny_settings.hub_cache, face_repo, Path(tiny_settings.face_models))
    settings = dataclasses.replace(tiny_settings, face_models=face_repo)
    engine = engine_mod.Engine(settings)
    engine.load_all()
    assert engine.unavailable == {} and engine.state["phase"] == "ready"

    plan = loading_mod.loader_files(settings)
    planned = {(repo_id, name) for (_, repo_id), names in plan.items() for name in names}
    assert planned == fetched
    yaml = preload_yaml(plan)
    assert yaml.startswith("preload_from_hub:\n") and "instantid-tiny/InstantID ControlNetModel/config.json," in yaml
