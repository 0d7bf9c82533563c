"""The live preview: a glimpse of the image while it denoises, for the page's gallery and the API's partial outputs.

SDXL's latents (scaled, as the UNet sees them) projected to RGB by one fixed linear map plus a bias: a blurry,
roughly coloured picture of where the image is going, with no VAE decode and no extra model. The render stage
(request/render.py's `run_pipeline`) calls it from the pipeline's step callback.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The numbers are the approximate SDXL factors ComfyUI publishes (comfy/latent_formats.py, class SDXL).
LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188))
LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
# About this many previews a run: each costs a projection and a device-to-host copy of a few KB (bench preview).
PREVIEWS_PER_RUN = 8


def preview_every(steps: int) -> int:
    """A preview after every this many denoising steps of a pass of `steps`."""
    return max(1, math.ceil(steps / PREVIEWS_PER_RUN))


@torch.no_grad()
def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """The first image of a (batch, 4, h, w) latent batch as RGB uint8 (h, w, 3) at latent resolution (1/8 of the
    image's side): small enough to cross ZeroGPU's process boundary at every preview. Computed on the latents'
    device; only the 3 x h x w bytes are copied to the host."""
    if latents.ndim != 4 or latents.shape[1] != len(LATENT_RGB):
        raise ValueError(f"latent_preview: expected (batch, 4, h, w) latents, got {tuple(latents.shape)}")
    first = latents[0].float()
    factors = torch.tensor(LATENT_RGB, device=first.device)
    bias = torch.tensor(LATENT_RGB_BIAS, device=first.device)
    rgb = torch.einsum("chw,cr->hwr", first, factors) + bias  # about -1..1
    rgb = ((rgb.nan_to_num_(0.0) + 1.0) * 127.5).clamp_(0, 255).round_().to(torch.uint8)
    return rgb.cpu().numpy()
