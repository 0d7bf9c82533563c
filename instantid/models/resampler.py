"""The Perceiver resampler that turns one 512-d face embedding into N face tokens for the UNet.

Every dimension is read from the checkpoint's tensor shapes (`ResamplerConfig.from_state_dict`), so a
head count that does not divide the width cannot be built: the head size is fixed at 64 (as in the
released checkpoint) and the head count is derived from the inner width, with a message naming the
checkpoint and the offending shapes when they do not line up.

Layer and key names follow the released `ip-adapter.bin` `image_proj` state dict so it loads as is.
Idea: the Perceiver resampler of IP-Adapter Plus (Tencent AI Lab), re-derived from the checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import CheckpointError

HEAD_DIM = 64


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int
    depth: int
    dim_head: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], source: str = "image_proj") -> ResamplerConfig:
        """Derive the shape from tensor shapes; raise CheckpointError naming `source` if inconsistent."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise CheckpointError(
                    f"{source} is not an InstantID resampler: key '{key}' is missing "
                    f"(found {len(sd)} keys, e.g. {sorted(sd)[:4]})."
                )
            return tuple(sd[key].shape)

        latents = shape("latents")
        if len(latents) != 3 or latents[0] != 1:
            raise CheckpointError(f"{source}: 'latents' should have shape (1, queries, width), found {latents}.")
        _, num_queries, dim = latents
        proj_in = shape("proj_in.weight")
        proj_out = shape("proj_out.weight")
        if proj_in[0] != dim:
            raise CheckpointError(f"{source}: proj_in.weight {proj_in} does not map to the latent width {dim}.")
        if proj_out[1] != dim:
            raise CheckpointError(f"{source}: proj_out.weight {proj_out} does not map from the latent width {dim}.")
        layer_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
        if not layer_ids or layer_ids != list(range(len(layer_ids))):
            raise CheckpointError(f"{source}: resampler layers are missing or not numbered 0..N-1 ({layer_ids}).")
        depth = len(layer_ids)
        inner = shape("layers.0.0.to_q.weight")[0]
        if inner % HEAD_DIM:
            raise CheckpointError(
                f"{source}: attention width {inner} (layers.0.0.to_q.weight {shape('layers.0.0.to_q.weight')}) "
                f"is not a multiple of the head size {HEAD_DIM}, so no whole number of heads fits."
            )
        ff_inner = shape("layers.0.1.1.weight")[0]
        if ff_inner % dim:
            raise CheckpointError(f"{source}: feed-forward width {ff_inner} is not a multiple of the width {dim}.")
        for i in layer_ids:
            expected = {
                f"layers.{i}.0.to_q.weight": (inner, dim),
                f"layers.{i}.0.to_kv.weight": (2 * inner, dim),
                f"layers.{i}.0.to_out.weight": (dim, inner),
                f"layers.{i}.1.1.weight": (ff_inner, dim),
                f"layers.{i}.1.3.weight": (dim, ff_inner),
            }
            for key, want in expected.items():
                got = shape(key)
                if got != want:
                    raise CheckpointError(f"{source}: {key} has shape {got}, expected {want} from the other layers.")
        return cls(
            dim=dim,
            depth=depth,
            dim_head=HEAD_DIM,
            heads=inner // HEAD_DIM,
            num_queries=num_queries,
            embedding_dim=proj_in[1],
            output_dim=proj_out[0],
            ff_mult=ff_inner // dim,
        )


class PerceiverAttention(nn.Module):
    """Latent queries attend over [input tokens, latents] (the Perceiver trick keeps latents in context)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        # The reference scales q and k by dim_head**-0.25 each, which is SDPA's default 1/sqrt(dim_head).
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(ModelMixin, ConfigMixin):
    """Face embedding (B, 512) or (B, T, 512) -> face tokens (B, num_queries, output_dim).

    A diffusers ModelMixin so the pipeline can register it like any sub-model (`.to()`, offload hooks,
    `save_pretrained`).
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    @classmethod
    def from_resampler_config(cls, config: ResamplerConfig) -> Resampler:
        return cls(**asdict(config))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.ndim == 2:
            embeds = embeds[:, None, :]
        latents = self.latents.expand(embeds.shape[0], -1, -1)
        x = self.proj_in(embeds)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_resampler(
    sd: Mapping[str, torch.Tensor], *, source: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Resampler:
    """Build a resampler shaped by `sd` and load it, without allocating random weights first."""
    config = ResamplerConfig.from_state_dict(sd, source)
    with torch.device("meta"):
        model = Resampler.from_resampler_config(config)
    # assign=True adopts the checkpoint tensors instead of copying into freshly allocated ones.
    tensors = {
        k: v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        for k, v in sd.items()
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: resampler keys do not match (missing {missing[:4]}, unexpected {unexpected[:4]})."
        )
    return model.eval().requires_grad_(False)
