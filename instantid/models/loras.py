"""Few-step LoRAs (the `speed` choice and LCM) on the one shared UNet, switched per request.

Two ways to apply a LoRA, chosen by the memory profile (`Profile.lora_mode`):

- "fused" (everything resident: ZeroGPU, large GPUs, CPU): the LoRA is folded into the weights of the layers
  it touches, so a LoRA speed costs exactly what the base UNet costs per step. The touched layers' original
  weights are kept once, beside them on the same device; going back copies them in, so the base weights come
  back bit for bit however often speeds change (subtracting the delta again drifts in fp16: measured on the
  H200, 2026-11-27). The copy is in place: the parameters stay the same tensors, so placement and ZeroGPU's
  packing never see a new one.
- "adapter" (offload profiles, whose host RAM has no room for a second copy of the touched layers): peft's
  adapter layers stay in the UNet and are switched on and off; the base weights are never written (exact
  too), at the price of the adapter's extra matmuls every step.

A LoRA's factors are read through diffusers' own loader (any format it converts: diffusers, kohya, peft),
taken out of peft's layers, and, in fused mode, the peft layers are removed again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class Factors:
    """One layer's LoRA: weight += scale * (up @ down), reshaped to the weight's shape."""

    down: torch.Tensor  # lora_A: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # lora_B: (out, rank) or (out, rank, 1, 1)
    scale: float

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-size weight delta, in `dtype` (float32 for the fold: fp16 products would round twice)."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        return (up @ down) * self.scale


def _peft_factors(unet: torch.nn.Module, adapter: str, source: str) -> dict[str, Factors]:
    """The factors of `adapter` from peft's LoRA layers in `unet`, by the name of the layer they adapt."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, Factors] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(adapter):
            raise CheckpointError(f"{source}: DoRA layers cannot be fused; use a plain LoRA.")
        up = module.lora_B[adapter].weight.detach()
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            shape = tuple(up.shape)
            raise CheckpointError(f"{source}: layer {name} has a {shape} up-projection; only 1x1 is supported.")
        down = module.lora_A[adapter].weight.detach()
        out[name] = Factors(down=down.clone(), up=up.clone(), scale=float(module.scaling[adapter]))
    if not out:
        raise CheckpointError(f"{source}: the LoRA adapts no layer of this base model's UNet.")
    return out


class LoraSwitch:
    """The LoRAs one UNet can run with, by name, and which one is on (`active`; None = the base weights)."""

    def __init__(self, pipe: Any, mode: str) -> None:
        if mode not in ("fused", "adapter"):
            raise ValueError(f"unknown LoRA mode {mode!r}")
        self.pipe = pipe
        self.mode = mode
        self.active: str | None = None
        self._factors: dict[str, dict[str, Factors]] = {}
        # fused mode: each touched layer's original weight, once for all LoRAs (the union of their layers).
        self._pristine: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self._factors)

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """What this switch holds beside the UNet, for the memory report: each LoRA's factors, and the kept
        original weights (fused mode)."""
        held = {name: [t for f in factors.values() for t in (f.down, f.up)] for name, factors in self._factors.items()}
        if self._pristine:
            held["lora_originals"] = list(self._pristine.values())
        return held

    def modules(self) -> dict[str, torch.nn.Module]:
        """`tensors()` as modules (no copy), so that the memory report and the benchmarks list them like the
        models: `<speed>_lora` for each LoRA's factors, `lora_originals` for the kept weights."""
        out = {}
        for name, tensors in self.tensors().items():
            held = torch.nn.Module()
            for i, t in enumerate(tensors):
                held.register_buffer(f"t{i}", t, persistent=False)
            out[name if name == "lora_originals" else f"{name}_lora"] = held
        return out

    def load(self, name: str, folder: str, weight_name: str, source: str) -> None:
        """Read a LoRA file through diffusers' loader and keep it as `name` (switched off)."""
        if name in self._factors:
            return
        self.use(None)
        unet = self.pipe.unet
        from diffusers.utils import logging as diffusers_logging

        # diffusers says, for every UNet-only LoRA, that the text encoders got no keys: true and expected.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            self.pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=name)
        finally:
            diffusers_logging.set_verbosity(level)
        factors = _peft_factors(unet, name, source)
        if self.mode == "adapter":
            self.pipe.disable_lora()
        else:
            # Only the factors are kept: the peft layers go, so no request pays for them per step.
            self.pipe.delete_adapters(name)
            if not getattr(unet, "peft_config", None):
                self.pipe.unload_lora_weights()
            params = dict(unet.named_parameters())
            weights = {layer: params[f"{layer}.weight"] for layer in factors}
            for layer, f in factors.items():
                w = weights[layer]
                f.down, f.up = f.down.to(w.device), f.up.to(w.device)
                if layer not in self._pristine:
                    self._pristine[layer] = w.detach().clone()
        self._factors[name] = factors

    def use(self, name: str | None) -> None:
        """Switch the UNet to the LoRA `name`, or back to its base weights (None)."""
        if name == self.active:
            return
        if name is not None and name not in self._factors:
            raise RuntimeError(f"LoRA {name!r} is not loaded")
        if self.mode == "adapter":
            if name is None:
                self.pipe.disable_lora()
            else:
                self.pipe.enable_lora()
                self.pipe.set_adapters([name], adapter_weights=[1.0])
        else:
            self._fuse(name)
        self.active = name

    @torch.no_grad()
    def _fuse(self, name: str | None) -> None:
        params = dict(self.pipe.unet.named_parameters())
        factors = self._factors.get(name, {}) if name is not None else {}
        for layer, original in self._pristine.items():
            weight = params[f"{layer}.weight"]
            f = factors.get(layer)
            if f is None:
                weight.copy_(original)
            else:
                # Folded in float32 from the original each time, so a speed's weights never depend on the path.
                weight.copy_((original.float() + f.delta().reshape(original.shape)).to(original.dtype))
