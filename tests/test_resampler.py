"""The resampler's shape comes from the checkpoint; bad shapes fail with a message naming them."""

from __future__ import annotations

import pytest
import torch

from instantid.errors import CheckpointError
from instantid.models.resampler import Resampler, ResamplerConfig, build_resampler
from instantid.models.tiny import resampler_state_dict


def released_shape_state_dict() -> dict[str, torch.Tensor]:
    """The released InstantID image_proj shapes, on the meta device (no memory, shapes only)."""
    return resampler_state_dict(dim=1280, depth=4, heads=20, num_queries=16, output_dim=2048, device="meta")


def test_released_checkpoint_shape_is_inferred() -> None:
    config = ResamplerConfig.from_state_dict(released_shape_state_dict())
    assert config == ResamplerConfig(
        dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4
    )
    assert config.heads * config.dim_head == config.dim  # the bug this project exists to prevent


@pytest.mark.parametrize(
    ("dim", "depth", "heads", "queries", "out", "ff"),
    [(64, 1, 1, 4, 64, 2), (128, 2, 2, 16, 96, 4), (256, 3, 4, 8, 2048, 1), (640, 1, 10, 32, 1280, 4)],
)
def test_shapes_round_trip(dim: int, depth: int, heads: int, queries: int, out: int, ff: int) -> None:
    sd = resampler_state_dict(dim=dim, depth=depth, heads=heads, num_queries=queries, output_dim=out, ff_mult=ff)
    model = build_resampler(sd, source="test")
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.num_queries, cfg.output_dim, cfg.ff_mult) == (
        dim,
        depth,
        heads,
        queries,
        out,
        ff,
    )
    # The loaded weights are the checkpoint's, bit for bit.
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    tokens = model(torch.randn(3, 512))
    assert tokens.shape == (3, queries, out)
    assert torch.isfinite(tokens).all()


def test_inner_width_not_a_multiple_of_head_size_is_refused() -> None:
    sd = resampler_state_dict(dim=64, depth=1, heads=1, num_queries=4, output_dim=64)
    sd["layers.0.0.to_q.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match=r"my-ckpt.*attention width 100.*\(100, 64\).*head size 64"):
        ResamplerConfig.from_state_dict(sd, "my-ckpt")


def test_inconsistent_layers_are_refused_with_the_key() -> None:
    sd = resampler_state_dict(dim=128, depth=2, heads=2, num_queries=4, output_dim=64)
    sd["layers.1.0.to_kv.weight"] = torch.zeros(64, 128)
    with pytest.raises(
        CheckpointError, match=r"layers\.1\.0\.to_kv\.weight has shape \(64, 128\), expected \(256, 128\)"
    ):
        ResamplerConfig.from_state_dict(sd, "ckpt")


def test_missing_key_and_not_a_resampler() -> None:
    with pytest.raises(CheckpointError, match="'latents' is missing"):
        ResamplerConfig.from_state_dict({"foo": torch.zeros(1)}, "ckpt")
    sd = resampler_state_dict(dim=64, depth=1, heads=1, num_queries=4, output_dim=64)
    sd["proj_in.weight"] = torch.zeros(32, 512)
    with pytest.raises(CheckpointError, match="proj_in.weight"):
        ResamplerConfig.from_state_dict(sd, "ckpt")


def test_attention_matches_the_reference_formula() -> None:
    """SDPA equals the reference's q*s, k*s (s = dim_head**-0.25) softmax attention over [x, latents]."""
    torch.manual_seed(0)
    model = Resampler(dim=128, depth=1, dim_head=64, heads=2, num_queries=4, embedding_dim=512, output_dim=64)
    attn = model.layers[0][0]
    x, lat = torch.randn(2, 1, 128), torch.randn(2, 4, 128)
    xn, ln = attn.norm1(x), attn.norm2(lat)
    q = attn.to_q(ln)
    k, v = attn.to_kv(torch.cat([xn, ln], 1)).chunk(2, -1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, -1, 2, 64).transpose(1, 2)

    s = 64**-0.25
    w = torch.softmax((heads(q) * s) @ (heads(k) * s).transpose(-2, -1), dim=-1)
    ref = attn.to_out((w @ heads(v)).transpose(1, 2).reshape(2, 4, 128))
    torch.testing.assert_close(attn(x, lat), ref, rtol=1e-5, atol=1e-5)
