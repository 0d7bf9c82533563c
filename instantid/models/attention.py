"""IP-adapter attention processors: the UNet's cross-attention also attends to the face tokens.

The face tokens ride at the end of `encoder_hidden_states`; each cross-attention layer splits them off,
runs its usual text attention plus one extra attention over the face tokens with its own `to_k_ip` /
`to_v_ip` projections, and adds `scale * face_attention`. Both attentions use PyTorch SDPA.

Per-request values (the adapter scale and the face-region masks) arrive through the pipeline's
`cross_attention_kwargs`, so nothing request-specific is stored on the processors.

Group portraits (`ip_people` = n > 1): n sets of face tokens, one per person, ride after the text tokens; each
set gets its own attention (its own softmax: the people never compete for a query) and acts only where that
person's region mask is 1. Outside a person's region their term is multiplied by exactly 0, so their tokens
cannot change the output there: locality is exact, not approximate. (That is the pipeline's shared pass,
`group_passes="shared"`; by default it runs the UNet once per person instead, each pass with one person's
tokens through the single-face path, masked to that person's region.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..errors import CheckpointError

# Sequence length -> (batch or 1, sequence, 1) mask, built once per request for every UNet resolution.
IPMasks = Mapping[int, torch.Tensor]


class SelfAttnProcessor(AttnProcessor2_0):
    """Plain SDPA self-attention that accepts (and ignores) our per-request kwargs.

    Without it diffusers would log a warning on every self-attention call that `ip_scale` is unused.
    """

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_scale: float = 1.0,
        ip_masks: IPMasks | None = None,
        ip_people: int = 1,
        **kwargs: object,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IPAttnProcessor(nn.Module):
    """Cross-attention over text tokens plus a scaled attention over the trailing face tokens."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_scale: float = 1.0,
        ip_masks: IPMasks | None = None,
        ip_people: int = 1,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            text, face = hidden_states, None
        else:
            n_face = self.num_tokens * ip_people
            text = encoder_hidden_states[:, :-n_face]
            face = encoder_hidden_states[:, -n_face:]
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        heads = attn.heads
        head_dim = query.shape[-1] // heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, heads, head_dim).transpose(1, 2)

        q = split(query)
        out = F.scaled_dot_product_attention(
            q, split(attn.to_k(text)), split(attn.to_v(text)), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)

        # A zero scale skips the second attention entirely rather than computing and discarding it.
        if face is not None and ip_scale != 0 and ip_people > 1:
            out = out + ip_scale * self._people_attention(q, face, ip_people, ip_masks, seq_len, split)
        elif face is not None and ip_scale != 0:
            ip = F.scaled_dot_product_attention(q, split(self.to_k_ip(face)), split(self.to_v_ip(face)))
            ip = ip.transpose(1, 2).reshape(batch, -1, heads * head_dim)
            if ip_masks is not None and (mask := ip_masks.get(seq_len)) is not None:
                ip = ip * mask.to(ip.dtype)
            out = out + ip_scale * ip

        out = attn.to_out[0](out.to(query.dtype))
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _people_attention(
        self,
        q: torch.Tensor,
        face: torch.Tensor,
        people: int,
        ip_masks: IPMasks | None,
        seq_len: int,
        split: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The sum over people of (their face attention x their region), (batch, sequence, width)."""
        masks = None if ip_masks is None else ip_masks.get(seq_len)
        if masks is None or masks.shape[0] != people:
            # Without every person's region each identity would act on every face: refuse rather than blend.
            raise ValueError(f"{people} people need {people} region masks at sequence length {seq_len}")
        batch, heads, _, head_dim = q.shape
        total = None
        for k in range(people):
            tokens = face[:, k * self.num_tokens : (k + 1) * self.num_tokens]
            ip = F.scaled_dot_product_attention(q, split(self.to_k_ip(tokens)), split(self.to_v_ip(tokens)))
            ip = ip.transpose(1, 2).reshape(batch, -1, heads * head_dim) * masks[k : k + 1].to(ip.dtype)
            total = ip if total is None else total + ip
        assert total is not None
        return total


def install_ip_processors(
    unet: nn.Module, ip_state_dict: Mapping[str, torch.Tensor], num_tokens: int, *, source: str
) -> int:
    """Replace the UNet's processors with IP processors loaded from `ip_state_dict`; return their count.

    Keys are positional: `{i}.to_k_ip.weight` belongs to the i-th entry of `unet.attn_processors`
    (self-attention entries carry no weights). Shapes are checked against each attention layer.
    """
    names = list(unet.attn_processors.keys())  # type: ignore[attr-defined]
    modules = dict(unet.named_modules())
    param = next(unet.parameters())
    processors: dict[str, nn.Module | SelfAttnProcessor] = {}
    used: set[str] = set()
    for i, name in enumerate(names):
        attn = modules[name.removesuffix(".processor")]
        if name.endswith("attn1.processor") or not getattr(attn, "is_cross_attention", True):
            processors[name] = SelfAttnProcessor()
            continue
        k_key, v_key = f"{i}.to_k_ip.weight", f"{i}.to_v_ip.weight"
        if k_key not in ip_state_dict or v_key not in ip_state_dict:
            raise CheckpointError(
                f"{source}: no IP-adapter weights for attention layer {i} ({name}); this ip-adapter was made "
                "for a different UNet than the base model."
            )
        k, v = ip_state_dict[k_key], ip_state_dict[v_key]
        want = (attn.to_q.out_features, attn.to_k.in_features)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise CheckpointError(
                f"{source}: {k_key} has shape {tuple(k.shape)} but layer {name} needs {want} "
                "(block width, cross-attention width); the ip-adapter does not match the base model."
            )
        with torch.device("meta"):
            proc = IPAttnProcessor(want[0], want[1], num_tokens)
        proc.load_state_dict(
            {"to_k_ip.weight": k.to(param.device, param.dtype), "to_v_ip.weight": v.to(param.device, param.dtype)},
            assign=True,
        )
        processors[name] = proc.requires_grad_(False)
        used.update((k_key, v_key))
    unused = sorted(set(ip_state_dict) - used)
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} IP-adapter weights match no attention layer of the base model "
            f"(e.g. {unused[:3]}); the ip-adapter was made for a different UNet."
        )
    unet.set_attn_processor(processors)  # type: ignore[attr-defined]
    return len(used) // 2
