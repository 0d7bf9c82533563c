"""SDXL-architecture parts at full or reduced width, with random weights: for the benchmarks only.

Every size keeps SDXL's depth and layout (3 UNet levels, transformer depths 1/2/10, two CLIP text
encoders of 12 and 32 layers, the 4-level VAE, an IdentityNet made `from_unet`, the released resampler
layout) and divides every width by `divisor`, so the checkpoint files hold the same keys as the real
repos and the loaders take the same code paths. `full` is real SDXL size (about 10 GB in fp16).

Two ways to materialise them:
- `write_checkpoints` writes safetensors files (and `ip-adapter.bin`) into a local Hugging Face cache,
  tensor by tensor from a meta-device model, so writing 10 GB never needs the float32 model in RAM;
- `build_components` builds the modules directly on a device in a dtype (the GPU benchmark: nothing
  to download, nothing on disk).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instantid.tiny import SCHEDULER_CONFIG, file_lock, ip_adapter_shapes
from instantid.tiny import SDXL_MODEL_INDEX as MODEL_INDEX

SIZES = ("full", "quick", "micro")
_DIVISORS = {"full": 1, "quick": 4, "micro": 16}


@dataclass(frozen=True)
class SDXLSize:
    """SDXL with every width divided by `divisor` (1, 2, 4, 8 or 16; depths and layout unchanged)."""

    name: str
    divisor: int

    @classmethod
    def named(cls, name: str) -> SDXLSize:
        if name not in _DIVISORS:
            raise ValueError(f"unknown size {name!r}: choose one of {', '.join(SIZES)}")
        return cls(name, _DIVISORS[name])

    @property
    def text_hidden(self) -> tuple[int, int]:
        return 768 // self.divisor, 1280 // self.divisor

    @property
    def cross_attention_dim(self) -> int:
        return sum(self.text_hidden)

    @property
    def groups(self) -> int:
        return 32 // self.divisor

    def unet_config(self) -> dict[str, Any]:
        d = self.divisor
        time_embed = 256 // d
        return {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320 // d, 640 // d, 1280 // d],
            "layers_per_block": 2,
            # diffusers' SDXL config names the head *count* attention_head_dim; heads stay 64/d wide.
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.groups,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed,
            # 6 size/crop time ids, each embedded to `time_embed`, plus text_encoder_2's pooled output.
            "projection_class_embeddings_input_dim": 6 * time_embed + self.text_hidden[1],
            "upcast_attention": False,
        }

    def vae_config(self) -> dict[str, Any]:
        d = self.divisor
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128 // d, 256 // d, 512 // d, 512 // d],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": self.groups,
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "force_upcast": True,
        }

    def text_configs(self) -> list[Any]:
        """CLIP ViT-L text (text_encoder) and OpenCLIP bigG text (text_encoder_2) configs."""
        from transformers import CLIPTextConfig

        out = []
        for hidden, layers, heads, act in (
            (self.text_hidden[0], 12, 12, "quick_gelu"),
            (self.text_hidden[1], 32, 20, "gelu"),
        ):
            out.append(
                CLIPTextConfig(
                    hidden_size=hidden,
                    intermediate_size=4 * hidden,
                    num_hidden_layers=layers,
                    num_attention_heads=heads,
                    max_position_embeddings=77,
                    vocab_size=49408,
                    projection_dim=hidden,
                    hidden_act=act,
                    bos_token_id=49406,
                    eos_token_id=49407,
                    pad_token_id=49407,
                )
            )
        return out

    def resampler_kwargs(self) -> dict[str, int]:
        """The released InstantID resampler (1280 wide, depth 4, 20 heads of 64, 16 queries), scaled."""
        dim = 1280 // self.divisor
        return {
            "dim": dim,
            "depth": 4,
            "heads": max(1, dim // 64),
            "num_queries": 16,
            "output_dim": self.cross_attention_dim,
            "ff_mult": 4,
        }


# --- meta-device modules (shapes and key names without memory) ------------------------------------


def meta_unet(size: SDXLSize) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**size.unet_config())


def meta_models(size: SDXLSize) -> dict[str, Any]:
    """Every part on the meta device: unet, controlnet, vae, text_encoder, text_encoder_2."""
    from diffusers import AutoencoderKL, ControlNetModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = meta_unet(size)
    te1, te2 = size.text_configs()
    with torch.device("meta"):
        return {
            "unet": unet,
            "controlnet": ControlNetModel.from_unet(unet),
            "vae": AutoencoderKL(**size.vae_config()),
            "text_encoder": CLIPTextModel(te1),
            "text_encoder_2": CLIPTextModelWithProjection(te2),
        }


# --- random weights ------------------------------------------------------------------------------


def random_like(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Random weights on the scale of PyTorch's default init; norms 1 and biases 0 keep activations sane."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if not t.is_floating_point():
        return t.zero_()
    if len(shape) >= 2:
        bound = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
        return t.uniform_(-bound, bound)
    return t.fill_(1.0 if name.endswith("weight") else 0.0)


def random_state_dict(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: random_like(k, tuple(v.shape), dtype) for k, v in model.state_dict().items()}


def image_proj_state_dict(
    size: SDXLSize, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Random resampler weights with the released layout (keys and shapes of `image_proj`)."""
    from instantid.resampler import Resampler

    kw = size.resampler_kwargs()
    with torch.device("meta"):
        resampler = Resampler(kw["dim"], kw["depth"], 64, kw["heads"], kw["num_queries"], 512, kw["output_dim"], 4)
    return {k: random_like(k, tuple(v.shape), dtype, device) for k, v in resampler.state_dict().items()}


def ip_adapter_payload(
    size: SDXLSize, unet: Any, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """`ip-adapter.bin`'s content: image_proj (resampler) and ip_adapter (to_k_ip/to_v_ip per layer)."""
    image_proj = image_proj_state_dict(size, dtype, device)
    ip = {key: random_like("w", shape, dtype, device) for key, shape in ip_adapter_shapes(unet).items()}
    return {"image_proj": image_proj, "ip_adapter": ip}


# --- checkpoints in a local Hugging Face cache ----------------------------------------------------


# The released ip-adapter.bin is 1.69 GB for about 424 M parameters: float32 on disk.
IP_ADAPTER_DTYPE = torch.float32

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def repo_ids(size: SDXLSize) -> dict[str, str]:
    return {
        "base_model": f"instantid-bench/sdxl-{size.name}",
        "base_model_fp16": f"instantid-bench/sdxl-fp16-{size.name}",
        "instantid_repo": f"instantid-bench/InstantID-{size.name}",
    }


def write_random_safetensors(model: Any, targets: dict[Path, torch.dtype]) -> None:
    """Write `model`'s state dict, random, to one safetensors file per (path, dtype), tensor by tensor.

    Streaming (the format is an 8-byte header length, a JSON header, then the raw tensors in order)
    keeps one tensor in memory instead of the whole model: a float32 SDXL UNet alone is 10 GB.
    Every file holds the same values, rounded to its dtype, like a repo's fp32 and fp16 variants.
    """
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = {}
    for path, dtype in targets.items():
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in shapes.items():
            n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reader expects the data to start 8-byte aligned
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "wb")  # noqa: SIM115 - closed below, after every tensor is written
        fh.write(len(raw).to_bytes(8, "little") + raw)
        files[path] = (fh, dtype)
    try:
        for key, shape in shapes.items():
            master = random_like(key, shape, torch.float32)
            for fh, dtype in files.values():
                fh.write(master.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        for fh, _ in files.values():
            fh.close()


def _write_base(size: SDXLSize, models: dict[str, Any], folder: Path) -> None:
    """The layout of stabilityai/stable-diffusion-xl-base-1.0: float32 files plus `.fp16` variants."""
    from instantid.tiny import _tokenizer

    for name, weights in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
    ):
        model = models[name]
        if name.startswith("text_encoder"):
            model.config.save_pretrained(folder / name)
            _tokenizer(folder / name.replace("text_encoder", "tokenizer"))
        else:
            model.save_config(folder / name)
        write_random_safetensors(
            model,
            {
                folder / name / f"{weights}.safetensors": torch.float32,
                folder / name / f"{weights}.fp16.safetensors": torch.float16,
            },
        )
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=1))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))


def _link_fp16_only(base_snapshot: Path, folder: Path) -> None:
    """The same weights as fp16 data under the plain file names (no variants), as some SDXL fine-tunes
    ship them; hard links, so no extra disk."""
    for src in base_snapshot.rglob("*"):
        if not src.is_file() or (src.suffix == ".safetensors" and ".fp16." not in src.name):
            continue
        dst = folder / src.relative_to(base_snapshot)
        dst = dst.with_name(dst.name.replace(".fp16.", "."))
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src.resolve(), dst)
        except OSError:
            shutil.copyfile(src, dst)


def _write_instantid(size: SDXLSize, models: dict[str, Any], folder: Path) -> None:
    """InstantX/InstantID's layout: an fp16 IdentityNet under the plain name and a float32 ip-adapter.bin."""
    net = models["controlnet"]
    net.save_config(folder / "ControlNetModel")
    write_random_safetensors(net, {folder / "ControlNetModel" / "diffusion_pytorch_model.safetensors": torch.float16})
    payload = ip_adapter_payload(size, models["unet"], IP_ADAPTER_DTYPE)
    torch.save(payload, folder / "ip-adapter.bin")


def write_checkpoints(cache: Path, size: SDXLSize, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Publish the random base model (two layouts) and InstantID repos for `size` into `cache`, once.

    Returns the repo ids, the seconds spent writing (0 when everything was reused) and bytes on disk.
    """
    from instantid.hub import is_published, publish_folder

    ids = repo_ids(size)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wrote = False
    with file_lock(cache / ".instantid-bench.lock"):
        models: dict[str, Any] | None = None
        for key, writer, marker in (
            ("base_model", _write_base, "model_index.json"),
            ("base_model_fp16", None, "model_index.json"),
            ("instantid_repo", _write_instantid, "ip-adapter.bin"),
        ):
            if is_published(cache, ids[key], marker=marker):
                continue
            models = models or meta_models(size)
            log(f"writing {ids[key]} ({size.name} size) into {cache}")
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "repo"
                if writer is None:
                    _link_fp16_only(_snapshot(cache, ids["base_model"]), src)
                else:
                    writer(size, models, src)
                publish_folder(cache, ids[key], src, move=True)
            wrote = True
    return {
        **ids,
        "write_seconds": round(time.perf_counter() - t0, 1) if wrote else 0.0,
        "files_bytes": {k: _repo_bytes(cache, v) for k, v in ids.items()},
    }


def _snapshot(cache: Path, repo_id: str) -> Path:
    from instantid.hub import cached_snapshot

    snapshot = cached_snapshot(cache, repo_id)
    if snapshot is None:
        raise FileNotFoundError(f"{repo_id} is not in the cache at {cache}")
    return snapshot


def _repo_bytes(cache: Path, repo_id: str) -> int:
    snap = _snapshot(cache, repo_id)
    return sum(p.stat().st_size for p in snap.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


# --- modules built directly on a device (GPU benchmark) -------------------------------------------


@contextmanager
def _default(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def _reinit(model: torch.nn.Module) -> torch.nn.Module:
    """Default-scale random weights in place (fast on a GPU; module constructors may have left zeros)."""
    for name, p in model.named_parameters():
        p.copy_(random_like(name, tuple(p.shape), p.dtype, p.device))
    return model.eval().requires_grad_(False)


def build_components(size: SDXLSize, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """unet, controlnet (IdentityNet), vae, two text encoders with tokenizers, scheduler and ip-adapter
    state dicts, all random, allocated on `device` in `dtype` from the start (no host copy, no download).
    """
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    device = torch.device(device)
    te1, te2 = size.text_configs()
    with _default(device, dtype):
        unet = _reinit(UNet2DConditionModel(**size.unet_config()))
        controlnet = _reinit(ControlNetModel.from_unet(unet))
        vae = _reinit(AutoencoderKL(**size.vae_config()))
        text_encoder = _reinit(CLIPTextModel(te1))
        text_encoder_2 = _reinit(CLIPTextModelWithProjection(te2))
    for m in (unet, controlnet, vae, text_encoder, text_encoder_2):
        tensors = [*m.parameters(), *m.buffers()]
        if any(t.device.type != device.type or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
            m.to(device=device, dtype=dtype)  # a constructor that ignored the defaults (integer ids stay int)
    payload = ip_adapter_payload(size, unet, dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import CLIPTokenizer

        from instantid.tiny import _tokenizer

        _tokenizer(Path(tmp) / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "tok"))
    return {
        "unet": unet,
        "controlnet": controlnet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        "ip_adapter": payload,
    }
