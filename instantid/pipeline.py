"""InstantIDPipeline: SDXL + IdentityNet ControlNet + face-token IP-adapter, on current diffusers.

The denoising loop is diffusers' own `StableDiffusionXLControlNetPipeline.__call__`; InstantID is
added around it rather than by forking the loop:

- the face tokens (resampler output) are appended to the text embeddings, so the UNet's IP attention
  processors (attention.py) find them at the end of `encoder_hidden_states`;
- forward pre-hooks give the IdentityNet the face tokens alone and any extra ControlNet the text tokens
  alone; a forward hook multiplies the IdentityNet residuals by the face-region mask;
- a group portrait (two or more people) runs the UNet once per person per step, each run with that person's
  face tokens and IdentityNet residuals alone, and keeps each run's prediction only inside that person's region
  (hooks on the UNet, `_person_pass_hooks`);
- the hooks and the masks live only for one call (registered in `__call__`, removed in `finally`).

The resampler is a registered sub-model, so `.to()`, `enable_model_cpu_offload` and `save_pretrained`
handle it like the UNet.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.models import MultiControlNetModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import InvalidParameter
from .prompts import encode_prompts
from .requests import PARAMS
from .resampler import Resampler

SCHEDULER_FACTORIES: dict[str, tuple[type, dict[str, Any]]] = {
    "EulerDiscreteScheduler": (EulerDiscreteScheduler, {}),
    "EulerAncestralDiscreteScheduler": (EulerAncestralDiscreteScheduler, {}),
    "DEISMultistepScheduler": (DEISMultistepScheduler, {}),
    "HeunDiscreteScheduler": (HeunDiscreteScheduler, {}),
    "DPMSolverMultistepScheduler": (DPMSolverMultistepScheduler, {}),
    "DPMSolverMultistepScheduler-Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DPMSolverMultistepScheduler-Karras-SDE": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    "UniPCMultistepScheduler": (UniPCMultistepScheduler, {}),
    "LCMScheduler": (LCMScheduler, {}),
    # The few-step LoRAs' samplers (requests.SPEEDS), as their model cards prescribe: trailing timesteps, so
    # that the first of a few steps starts from pure noise.
    "DDIMScheduler-trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "EulerDiscreteScheduler-trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
}


@dataclass
class ExtraControl:
    """One extra ControlNet for one call: the net, its condition image and its strength."""

    name: str
    net: ControlNetModel
    image: PIL.Image.Image
    scale: float


@dataclass
class InstantIDOutput:
    images: list[PIL.Image.Image]
    timings_ms: dict[str, float] = field(default_factory=dict)


# --- the live preview -------------------------------------------------------------------------------
# SDXL's latents (scaled, as the UNet sees them) projected to RGB by one fixed linear map plus a bias: a
# blurry, roughly coloured picture of where the image is going, with no VAE decode and no extra model.
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


def _sync(device: torch.device) -> None:
    # Only at stage boundaries, for honest per-stage timings; never inside the denoising loop.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def face_tokens(
    resampler: Resampler,
    face_embedding: np.ndarray | torch.Tensor,
    device: torch.device,
    uncond_cache: dict[tuple[str, torch.dtype], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Face tokens for an embedding, and for the zero embedding (InstantID's unconditional branch).

    The zero embedding's tokens depend only on the resampler's weights, which never change after
    loading, so they are computed once per device and dtype into `uncond_cache`, not once per request.
    """
    dtype = resampler.dtype
    emb = torch.as_tensor(np.asarray(face_embedding, dtype=np.float32)).reshape(1, 1, -1)
    tokens = resampler(emb.to(device=device, dtype=dtype))
    key = (str(device), dtype)
    if key not in uncond_cache:
        uncond_cache[key] = resampler(torch.zeros_like(emb).to(device=device, dtype=dtype))
    return tokens, uncond_cache[key]


def mask_pyramid(mask: np.ndarray, latent_hw: tuple[int, int], levels: int = 4) -> dict[int, torch.Tensor]:
    """Face mask sampled at every UNet resolution, keyed by sequence length (h * w) for the processors.

    Nearest sampling, as the official Space's attention processor does: every attention cell is either in
    the face box or out of it (bilinear gave the border cells fractions: 1-3% of cells differed).
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    out: dict[int, torch.Tensor] = {}
    h, w = latent_hw
    for _ in range(levels):
        out[h * w] = F.interpolate(m, size=(h, w), mode="nearest").reshape(1, h * w, 1)
        # UNet downsamplers are stride-2 convolutions with padding 1: sizes round up.
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


class InstantIDMixin:
    """InstantID on top of one of diffusers' SDXL ControlNet pipelines (text-to-image, img2img, inpaint).

    Everything InstantID adds lives here, once: the face tokens, the ControlNet hooks, the IP-attention
    masks and schedulers. The denoising loop is the diffusers pipeline's own, reached through
    `super().__call__`, with the condition images under the name that pipeline gives them
    (`_control_arg`). `controlnet` is the IdentityNet (always net 0); extra ControlNets are passed per call.
    """

    # The ControlNet runs every step beside the UNet: keeping it out of the offload chain avoids a
    # host<->device round trip per step (engine's model-offload profile places it on the GPU).
    model_cpu_offload_seq = "text_encoder->text_encoder_2->resampler->unet->vae"
    _exclude_from_cpu_offload = ["controlnet"]
    _optional_components = [*StableDiffusionXLControlNetPipeline._optional_components, "resampler"]
    # The keyword under which the diffusers pipeline takes the ControlNet condition images.
    _control_arg = "image"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        scheduler: Any,
        resampler: Resampler | None = None,
        force_zeros_for_empty_prompt: bool = True,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_aesthetics_score: bool = False,
    ) -> None:
        # Only diffusers' img2img and inpaint pipelines take (and record) this; SDXL base models leave it off.
        options = {"requires_aesthetics_score": requires_aesthetics_score} if self._control_arg != "image" else {}
        super().__init__(  # type: ignore[call-arg]
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=False,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            **options,
        )
        self.register_modules(resampler=resampler)
        self._scheduler_config = dict(scheduler.config)
        self._scheduler_name = "EulerDiscreteScheduler"

    # --- per-request switches ------------------------------------------------------------------

    def set_scheduler(self, name: str) -> None:
        """Swap the scheduler (built from the base model's scheduler config); cheap, no weights."""
        if name not in SCHEDULER_FACTORIES:
            raise InvalidParameter("scheduler", name, f"choose one of {', '.join(SCHEDULER_FACTORIES)}")
        if name == self._scheduler_name:
            return
        cls, extra = SCHEDULER_FACTORIES[name]
        self.scheduler = cls.from_config(self._scheduler_config, **extra)
        self._scheduler_name = name

    # --- face tokens ---------------------------------------------------------------------------

    @property
    def num_face_tokens(self) -> int:
        assert self.resampler is not None, "InstantIDPipeline needs a resampler"
        return int(self.resampler.config.num_queries)

    @torch.no_grad()
    def encode_face(
        self, face_embedding: np.ndarray | torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) face tokens, each (1, num_queries, cross_attention_dim)."""
        assert self.resampler is not None, "InstantIDPipeline needs a resampler"
        cache: dict[tuple[str, torch.dtype], torch.Tensor] = self.__dict__.setdefault("_uncond_tokens", {})
        return face_tokens(self.resampler, face_embedding, device, cache)

    # --- hooks -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _controlnet_hooks(
        self,
        extras: Sequence[ExtraControl],
        face_mask: np.ndarray | None,
        regions: Sequence[np.ndarray] = (),
        combine: str = "mask",
        passes: str = "person",
    ) -> Iterator[None]:
        n_face = self.num_face_tokens
        identitynet = self.controlnet
        handles = []
        if len(regions) > 1:
            if passes not in ("person", "shared"):
                raise InvalidParameter("group_passes", passes, "use person or shared")
            residuals: list[Any] = [None] * len(regions)
            handles += self._group_identitynet_hooks(identitynet, regions, combine, residuals)
            if passes == "person":
                if extras:
                    raise InvalidParameter("extra_controls", [e.name for e in extras],
                                           "a group portrait's per-person passes take no extra ControlNets")
                handles += self._person_pass_hooks(regions, residuals)
            identitynet_nets = [identitynet] * len(regions)
        else:
            identitynet_nets = [identitynet]

        def face_tokens_only(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, -n_face:]
            return args, kwargs

        def text_tokens_only(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :-n_face]
            return args, kwargs

        if len(regions) <= 1:
            handles.append(identitynet.register_forward_pre_hook(face_tokens_only, with_kwargs=True))
        for extra in extras:
            handles.append(extra.net.register_forward_pre_hook(text_tokens_only, with_kwargs=True))
        if face_mask is not None:
            cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}
            base = torch.from_numpy(np.ascontiguousarray(face_mask, dtype=np.float32))[None, None]

            def resized(t: torch.Tensor) -> torch.Tensor:
                key = (t.shape[-2], t.shape[-1], t.dtype, t.device)
                # Bilinear here, as the official Space scales the IdentityNet residuals (only its IP-attention
                # mask is nearest); once per resolution per request, not once per step.
                if key not in cache:
                    cache[key] = F.interpolate(base, size=key[:2], mode="bilinear", align_corners=False).to(
                        t.device, t.dtype
                    )
                return cache[key]

            def mask_residuals(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                down, mid = output[0], output[1]
                return [d * resized(d) for d in down], mid * resized(mid)

            handles.append(identitynet.register_forward_hook(mask_residuals, with_kwargs=True))
        swapped = bool(extras) or len(identitynet_nets) > 1
        if swapped:
            # MultiControlNetModel only for this call; net 0 is always the IdentityNet (a group portrait: nets
            # 0..n-1 are the IdentityNet again, once per person, each with that person's keypoint image).
            self.controlnet = MultiControlNetModel([*identitynet_nets, *[e.net for e in extras]])
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if swapped:
                self.controlnet = identitynet

    def _group_identitynet_hooks(
        self, identitynet: torch.nn.Module, regions: Sequence[np.ndarray], combine: str, residuals: list[Any]
    ) -> list[Any]:
        """Hooks that make the IdentityNet, called once per person per step (nets 0..n-1 of this call's
        MultiControlNetModel, in person order), see person k's face tokens alone, and (`combine` "mask") keep
        its residuals only inside person k's region; "sum" leaves them unmasked (measured against masking in
        BENCHMARKS.md). Each run sees only its own person's keypoints and tokens: person A's residual depends
        on A's inputs alone. Person k's residuals of the running step are left in `residuals[k]` for the
        per-person UNet passes (the MultiControlNetModel hands the UNet only their sum)."""
        if combine not in ("mask", "sum"):
            raise InvalidParameter("combine", combine, "use mask or sum")
        n_face, people = self.num_face_tokens, len(regions)
        calls = [0]  # IdentityNet calls so far in this pipeline call: person = calls % people
        bases = [torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32))[None, None] for r in regions]
        cache: dict[tuple[int, int, int, torch.dtype, torch.device], torch.Tensor] = {}

        def resized(k: int, t: torch.Tensor) -> torch.Tensor:
            key = (k, t.shape[-2], t.shape[-1], t.dtype, t.device)
            if key not in cache:  # bilinear, as the single face's residual mask
                cache[key] = F.interpolate(bases[k], size=key[1:3], mode="bilinear", align_corners=False).to(
                    t.device, t.dtype
                )
            return cache[key]

        def own_tokens(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            k = calls[0] % people
            states = kwargs["encoder_hidden_states"]
            start = states.shape[1] - (people - k) * n_face
            kwargs["encoder_hidden_states"] = states[:, start : start + n_face]
            return args, kwargs

        def own_region(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            k = calls[0] % people
            calls[0] += 1
            if combine == "mask":
                output = [d * resized(k, d) for d in output[0]], output[1] * resized(k, output[1])
            residuals[k] = output
            # MultiControlNetModel adds the later people's mid residuals into the first one's in place: it gets a
            # copy, so that residuals[0] stays person 0's own.
            return output[0], output[1].clone()

        return [
            identitynet.register_forward_pre_hook(own_tokens, with_kwargs=True),
            identitynet.register_forward_hook(own_region, with_kwargs=True),
        ]

    def _person_pass_hooks(self, regions: Sequence[np.ndarray], residuals: list[Any]) -> list[Any]:
        """Hooks that make each UNet call of a group portrait one pass per person: pass k sees the text tokens,
        person k's face tokens alone (acting in k's region) and person k's IdentityNet residuals alone; inside
        person k's region the prediction is pass k's, outside every region it is the mean of the passes.

        Why: with one shared pass, person B's identity also reaches A's face through everything in the UNet that
        mixes positions (its GroupNorms' statistics over the whole image, self-attention, convolutions): B's
        change showed up in A's face at about half its strength in B's own (BENCHMARKS.md, "group locality").
        In its own pass A's face is computed without B's identity at all; B reaches it only as image content,
        through the latents of the steps before. The idea is regional sampling with one denoising pass per
        region, composited every step (MultiDiffusion, Bar-Tal et al. 2023).

        The pre-hook turns the pipeline's UNet call into person 0's pass; the forward hook runs the others
        (calling the UNet again, its hooks stepped over) and composites. Hooks, not a replaced `forward`:
        accelerate's offload hooks live on `forward` and are re-installed during a call."""
        n_face, people = self.num_face_tokens, len(regions)
        bases = [torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32))[None, None] for r in regions]
        state: dict[str, Any] = {"inner": False}
        cache: dict[tuple[int, torch.Size, torch.device], torch.Tensor] = {}

        def inside(k: int, size: torch.Size, device: torch.device) -> torch.Tensor:
            # Nearest, as the IP-attention masks: a latent cell is in a person's region or out of it.
            if (k, size, device) not in cache:
                cache[k, size, device] = F.interpolate(bases[k], size=size, mode="nearest").to(device) > 0
            return cache[k, size, device]

        def person_kwargs(kwargs: dict[str, Any], k: int) -> dict[str, Any]:
            states = kwargs["encoder_hidden_states"]
            text = states.shape[1] - people * n_face
            attention = dict(kwargs.get("cross_attention_kwargs") or {})
            masks = attention.pop("ip_masks")
            attention.pop("ip_people", None)
            down, mid = residuals[k]
            return {
                **kwargs,
                "encoder_hidden_states": torch.cat(
                    [states[:, :text], states[:, text + k * n_face : text + (k + 1) * n_face]], dim=1
                ),
                # One person's tokens: the single-face path of the IP processors, masked to k's region.
                "cross_attention_kwargs": {**attention, "ip_masks": {n: m[k : k + 1] for n, m in masks.items()}},
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }

        def first_pass(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if state["inner"]:
                return None
            if any(r is None for r in residuals):
                raise RuntimeError("the IdentityNet did not run for every person before the UNet")
            state["kwargs"] = kwargs
            return args, person_kwargs(kwargs, 0)

        def other_passes(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if state["inner"]:
                return None
            full = state.pop("kwargs")
            predictions = [output[0]]
            state["inner"] = True
            try:
                for k in range(1, people):
                    predictions.append(module(*args, **person_kwargs(full, k))[0])
            finally:
                state["inner"] = False
            residuals[:] = [None] * people  # the next step's IdentityNet runs fill them again
            first = predictions[0]
            size = first.shape[-2:]
            # Outside the regions no pass is preferred: their mean. Inside, pass k's exactly (torch.where, not a
            # weighted sum, so that person k's region holds nothing computed with another person's identity).
            composite = torch.stack(predictions).mean(dim=0)
            for k in range(people):
                composite = torch.where(inside(k, size, first.device), predictions[k], composite)
            return (composite, *output[1:])

        return [
            self.unet.register_forward_pre_hook(first_pass, with_kwargs=True),
            self.unet.register_forward_hook(other_passes, with_kwargs=True),
        ]

    @contextlib.contextmanager
    def _encode_in_vae_dtype(self) -> Iterator[None]:
        """For one call, the photo reaches the VAE encoder in the VAE's own dtype, and the VAE keeps it.

        diffusers' img2img and inpaint pipelines encode the photo in the UNet's dtype, and for a VAE flagged
        `force_upcast` cast the VAE to fp32 and then to the UNet's dtype. Our profiles give the VAE its own
        dtype (bf16 or fp32 beside an fp16 UNet, as fp16 overflows in SDXL's VAE): the first fails ("Input
        type (Half) and bias type (BFloat16)"), the second would leave the VAE in fp16. Only an fp16 VAE
        keeps diffusers' upcast.
        """
        vae = self.vae
        if self._control_arg == "image":  # text to image: nothing is encoded
            yield
            return
        upcast = bool(getattr(vae.config, "force_upcast", False))
        own = vae.dtype

        def cast(module: torch.nn.Module, args: tuple) -> tuple:
            return (args[0].to(next(module.parameters()).dtype), *args[1:])

        handle = vae.encoder.register_forward_pre_hook(cast)
        if own != torch.float16:
            vae.register_to_config(force_upcast=False)
        try:
            yield
        finally:
            handle.remove()
            vae.register_to_config(force_upcast=upcast)

    # --- the call --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        face_embedding: np.ndarray | torch.Tensor,
        keypoint_image: PIL.Image.Image,
        extra_controls: Sequence[ExtraControl] = (),
        identitynet_strength: float = PARAMS["identitynet_strength"].default,
        adapter_strength: float = PARAMS["adapter_strength"].default,
        face_mask: np.ndarray | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        output_type: str = "pil",
        group: Sequence[Any] = (),
        group_residuals: str = "mask",
        group_passes: str = "person",
        **kwargs: Any,
    ) -> InstantIDOutput:
        """Images of the identity in `face_embedding`, posed by `keypoint_image`.

        `face_mask` (height x width, 0..1) limits the identity conditioning to the face region
        ("enhance face region"); `extra_controls` adds pose/canny/depth ControlNets for this call. The
        img2img and inpaint variants take their own arguments (`image`, `mask_image`, `strength`) in `kwargs`.

        `group` (two or more people, each with `embedding`, `keypoint_image` and `region`, as
        `instantid.requests.GroupPerson`): one set of face tokens, one IdentityNet run and (by default) one UNet
        pass per person, each acting only in that person's region; `face_embedding`, `keypoint_image` and
        `face_mask` are then not used.
        `group_residuals` says whether each person's IdentityNet residuals are kept only in their region ("mask")
        or left whole ("sum"); `group_passes` whether the UNet runs once per person per step, each pass kept in its
        person's region ("person"), or once for everyone ("shared"); both measured in BENCHMARKS.md.
        """
        # The request's own declaration: one default and one range for every caller.
        identitynet_strength = PARAMS["identitynet_strength"].check(identitynet_strength)
        adapter_strength = PARAMS["adapter_strength"].check(adapter_strength)
        if height % 8 or width % 8:
            raise InvalidParameter("height/width", (height, width), "must be multiples of 8")
        timings: dict[str, float] = {}
        device = self._execution_device
        t0 = time.perf_counter()
        people = list(group) if len(group) > 1 else []
        embeddings = [p.embedding for p in people] if people else [face_embedding]
        text, prompt_embeds, negative_embeds = self._embeds(prompt, negative_prompt, embeddings, device)
        _sync(device)
        timings["encode_ms"] = (time.perf_counter() - t0) * 1000

        keypoints = [p.keypoint_image for p in people] if people else [keypoint_image]
        regions = [p.region for p in people]
        if people:
            face_mask = None  # each person's region takes its place
            attention_kwargs = {"ip_scale": float(adapter_strength), "ip_people": len(people),
                                "ip_masks": self._people_masks(regions, height, width, device)}
        else:
            attention_kwargs = {"ip_scale": float(adapter_strength),
                                "ip_masks": self._ip_masks(face_mask, height, width, device)}
        images: list[PIL.Image.Image] | PIL.Image.Image = keypoint_image
        scales: list[float] | float = float(identitynet_strength)
        if extra_controls or people:
            images = [*keypoints, *[e.image for e in extra_controls]]
            scales = [float(identitynet_strength)] * len(keypoints) + [float(e.scale) for e in extra_controls]

        t1 = time.perf_counter()
        hooks = self._controlnet_hooks(extra_controls, face_mask, regions, group_residuals, group_passes)
        with hooks, self._encode_in_vae_dtype():
            out = super().__call__(  # type: ignore[misc]
                **{self._control_arg: images},
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=text.pooled_prompt_embeds,
                negative_pooled_prompt_embeds=text.negative_pooled_prompt_embeds,
                controlnet_conditioning_scale=scales,
                cross_attention_kwargs=attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                output_type="latent",
                return_dict=False,
                **kwargs,
            )
        latents = out[0]
        _sync(device)
        timings["denoise_ms"] = (time.perf_counter() - t1) * 1000

        t2 = time.perf_counter()
        result = self.decode_latents_to_images(latents, output_type)
        _sync(device)
        timings["decode_ms"] = (time.perf_counter() - t2) * 1000
        self.maybe_free_model_hooks()
        return InstantIDOutput(images=result, timings_ms=timings)

    def _embeds(
        self,
        prompt: str,
        negative_prompt: str,
        face_embeddings: Sequence[np.ndarray | torch.Tensor],
        device: torch.device,
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The text encoders' output, and the (conditional, unconditional) embeddings with the face tokens after
        the text tokens, where the IP-attention processors look for them (a group: each person's in turn)."""
        # Any length, with emphasis, in 75-token blocks (prompts.py); diffusers only repeats these per image.
        text = encode_prompts(self, prompt, negative_prompt, device)
        conditional, unconditional = [text.prompt_embeds], [text.negative_prompt_embeds]
        for embedding in face_embeddings:
            face, face_uncond = self.encode_face(embedding, device)
            conditional.append(face.to(text.prompt_embeds.dtype))
            unconditional.append(face_uncond.to(text.negative_prompt_embeds.dtype))
        return text, torch.cat(conditional, dim=1), torch.cat(unconditional, dim=1)

    def _people_masks(
        self, regions: Sequence[np.ndarray], height: int, width: int, device: torch.device
    ) -> dict[int, torch.Tensor]:
        """Each person's region at every UNet resolution, stacked in person order: (people, sequence, 1)."""
        pyramids = [self._ip_masks(np.asarray(region), height, width, device) for region in regions]
        return {key: torch.cat([p[key] for p in pyramids if p is not None], dim=0) for key in pyramids[0] or {}}

    def _ip_masks(
        self, face_mask: np.ndarray | None, height: int, width: int, device: torch.device
    ) -> dict[int, torch.Tensor] | None:
        """The face mask at every UNet resolution, for the IP-attention processors (None: no mask)."""
        if face_mask is None:
            return None
        if face_mask.shape != (height, width):
            raise InvalidParameter("face_mask", face_mask.shape, f"must be {(height, width)}")
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return {k: v.to(device) for k, v in mask_pyramid(face_mask, latent_hw).items()}

    @torch.no_grad()
    def decode_latents_to_images(self, latents: torch.Tensor, output_type: str = "pil") -> list[Any]:
        """VAE decode in the VAE's own dtype (bf16 or fp32: SDXL's VAE overflows in fp16)."""
        vae = self.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        decode_dtype = vae.dtype
        cfg = vae.config
        latents = latents.to(decode_dtype)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        # Accelerate's offload hook moves the VAE in on decode; the input must live on its device.
        latents = latents.to(self._execution_device)
        decoded = vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(decoded.float(), output_type=output_type)


class InstantIDPipeline(InstantIDMixin, StableDiffusionXLControlNetPipeline):
    """Text to image with InstantID (the Generate mode)."""


class InstantIDImg2ImgPipeline(InstantIDMixin, StableDiffusionXLControlNetImg2ImgPipeline):
    """A source photo (`image`) noised by `strength` and redrawn with InstantID (the Restyle mode)."""

    _control_arg = "control_image"


class InstantIDInpaintPipeline(InstantIDMixin, StableDiffusionXLControlNetInpaintPipeline):
    """The white region of `mask_image` in `image` redrawn with InstantID (the Face swap mode). With the base
    model's 4-channel UNet, diffusers keeps the latents outside the mask on the photo's at every step."""

    _control_arg = "control_image"


def share_pipeline(base: InstantIDMixin, cls: type[InstantIDMixin]) -> Any:
    """A `cls` pipeline on `base`'s very modules (no second copy of any weight), placed as `base` is.

    Accelerate's offload hooks sit on the modules themselves; the pipeline object only remembers where
    it offloads to, so that is copied over too (diffusers' `_execution_device` and the hook release read it).
    """
    pipe = cls(**base.components)  # type: ignore[arg-type]
    # The scheduler it was handed is whichever `base` used last (LCM's, perhaps): keep the base model's config.
    # Its progress bar is off as `base`'s is (restyle and swap printed a tqdm bar per request).
    attrs = ("_offload_device", "_offload_gpu_id", "_all_hooks", "_scheduler_config", "_scheduler_name",
             "_progress_bar_config")
    for attr in attrs:
        if hasattr(base, attr):
            setattr(pipe, attr, getattr(base, attr))
    return pipe


def mode_pipelines(base: InstantIDPipeline) -> dict[str, Any]:
    """The pipelines a mode can run with (`instantid.requests.PIPELINES`), all on `base`'s modules."""
    return {
        "base": base,
        "img2img": share_pipeline(base, InstantIDImg2ImgPipeline),
        "inpaint": share_pipeline(base, InstantIDInpaintPipeline),
    }
