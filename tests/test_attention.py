"""IP-adapter weights land on the right processors, and the processors compute what they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from instantid.errors import CheckpointError
from instantid.models.attention import IPAttnProcessor, SelfAttnProcessor, install_ip_processors
from instantid.models.tiny import ModelShape, build_unet, ip_adapter_state_dict


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


@pytest.mark.parametrize("size", [(1024, 832), (1016, 760), (128, 128)])
def test_face_mask_reaches_attention_by_nearest_sampling(size: tuple[int, int]) -> None:
    """Every attention cell takes the pixel mask's value at floor(cell * pixels / cells): 0 or 1, no blend."""
    from instantid.models.pipeline import mask_pyramid
    from instantid.vision.geometry import face_mask

    width, height = size
    pixels = face_mask((width, height), (width * 0.31 + 0.4, height * 0.27 + 0.6, width * 0.69, height * 0.71))
    pyramid = mask_pyramid(pixels, (height // 8, width // 8))
    h, w = height // 8, width // 8
    for _ in range(4):
        rows = np.floor(np.arange(h) * (height / h)).astype(int)
        cols = np.floor(np.arange(w) * (width / w)).astype(int)
        expected = pixels[rows][:, cols]
        got = pyramid[h * w].reshape(h, w).numpy()
        assert np.array_equal(got, expected), (h, w)
        assert set(np.unique(got)) <= {0.0, 1.0}
        if height % 64 == 0 and width % 64 == 0:
            # The official Space's own call: scale factor 1 / sqrt(pixels per cell), nearest.
            ratio = (height * width / (h * w)) ** 0.5
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(pixels)[None, None], scale_factor=1 / ratio, mode="nearest"
            )
            assert torch.equal(pyramid[h * w].reshape(1, 1, h, w), ref)
        h, w = -(-h // 2), -(-w // 2)
