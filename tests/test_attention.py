"""IP-adapter weights land on the right processors, and the processors compute what they should."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from instantid.attention import IPAttnProcessor, SelfAttnProcessor, install_ip_processors
from instantid.errors import CheckpointError
from instantid.tiny import ModelShape, build_unet, ip_adapter_state_dict


@pytest.fixture()
def unet():
    return build_unet(ModelShape.tiny())


def test_weights_land_on_cross_attention_processors_by_position(unet) -> None:
    names = list(unet.attn_processors)
    sd = ip_adapter_state_dict(unet, seed=3)
    count = install_ip_processors(unet, sd, num_tokens=4, source="test")
    procs = unet.attn_processors
    cross = [i for i, n in enumerate(names) if n.endswith("attn2.processor")]
    assert count == len(cross) > 0
    for i, name in enumerate(names):
        proc = procs[name]
        if i in cross:
            assert isinstance(proc, IPAttnProcessor)
            assert torch.equal(proc.to_k_ip.weight, sd[f"{i}.to_k_ip.weight"])
            assert torch.equal(proc.to_v_ip.weight, sd[f"{i}.to_v_ip.weight"])
            assert proc.num_tokens == 4
        else:
            assert isinstance(proc, SelfAttnProcessor)
    # Registered as sub-modules: they follow .to() and count in the UNet's memory.
    assert any("to_k_ip" in k for k in unet.state_dict())


def test_mismatched_checkpoints_are_refused(unet) -> None:
    sd = ip_adapter_state_dict(unet)
    first = next(iter(sd))
    bad_shape = dict(sd)
    bad_shape[first] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"ckpt: .*has shape \(3, 3\)"):
        install_ip_processors(build_unet(ModelShape.tiny()), bad_shape, 4, source="ckpt")
    missing = dict(sd)
    missing.pop(first)
    with pytest.raises(CheckpointError, match="no IP-adapter weights for attention layer"):
        install_ip_processors(build_unet(ModelShape.tiny()), missing, 4, source="ckpt")
    extra = dict(sd)
    extra["999.to_k_ip.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="match no attention layer"):
        install_ip_processors(build_unet(ModelShape.tiny()), extra, 4, source="ckpt")


def _cross_attention(unet):
    return next(m for n, m in unet.named_modules() if n.endswith("attn2"))


def test_processor_math(unet) -> None:
    attn = _cross_attention(unet)
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    text = torch.randn(2, 7, attn.to_k.in_features)
    face = torch.randn(2, 4, attn.to_k.in_features)
    proc = IPAttnProcessor(attn.to_q.out_features, attn.to_k.in_features, num_tokens=4)
    plain = AttnProcessor2_0()(attn, hidden, text)
    both = torch.cat([text, face], dim=1)
    # Scale 0: exactly the text-only attention (and the face attention is skipped, not computed).
    torch.testing.assert_close(proc(attn, hidden, both, ip_scale=0.0), plain)
    # Scale s: text attention + s * face attention through to_out (linear, so the difference scales).
    d1 = proc(attn, hidden, both, ip_scale=1.0) - plain
    d2 = proc(attn, hidden, both, ip_scale=0.5) - plain
    assert d1.abs().max() > 1e-4
    torch.testing.assert_close(d2 * 2, d1, rtol=1e-4, atol=1e-5)
    # A mask of zeros removes the face attention; ones leave it as is.
    masks0 = {16: torch.zeros(1, 16, 1)}
    masks1 = {16: torch.ones(1, 16, 1)}
    torch.testing.assert_close(proc(attn, hidden, both, ip_scale=1.0, ip_masks=masks0), plain)
    torch.testing.assert_close(proc(attn, hidden, both, ip_scale=1.0, ip_masks=masks1), d1 + plain)
