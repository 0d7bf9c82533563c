"""Prompts of any length, with emphasis, read in 75-token blocks by both SDXL text encoders.

CLIP's text encoders see 77 positions: a start token, 75 text tokens, an end token. A longer prompt is
cut into blocks of 75 tokens; each block gets its own start and end token, is padded to 77 with the
tokenizer's pad token and is encoded alone; the blocks' penultimate hidden states are laid end to end
(77 x blocks positions for the UNet's cross-attention). Prompt and negative prompt get the same number
of blocks (the shorter one gains empty blocks), since classifier-free guidance batches them together.

Emphasis follows the AUTOMATIC1111 syntax: `(words)` x1.1, `[words]` /1.1, `(words:1.3)` x1.3, nested
groups multiply, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters. A bracket without its partner is
read as a literal character, never an error; a weight past +-MAX_WEIGHT is refused. A weight w moves a
token's embedding away from (w > 1) or towards (w < 1) the embedding of the end token closing its block:
`end + (token - end) * w`; nothing is renormalised, and tokens of weight 1 keep their embedding bit for bit.

The pooled embedding (SDXL's global text condition) is text_encoder_2's pooled output of the text's own
last block. The official Space takes the last block of all: where the other text needed more blocks, that
is an empty padding block, and a short prompt beside a long negative prompt lost its global condition.

A plain prompt of at most 75 tokens makes one block that is exactly diffusers' `encode_prompt` input
(same ids, same padding, same encoder call), so its embeddings are unchanged to the bit.
"""

# Block rule, weight formula and last-block pooled output re-derived from the encoder the official Space
# runs (instantX-research/InstantID, pipeline_stable_diffusion_xl_instantid_full.py, after diffusers'
# community lpw_stable_diffusion_xl); the emphasis syntax is AUTOMATIC1111's.

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.utils.torch_utils import get_module_execution_device
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import InvalidParameter

ROUND_FACTOR = 1.1  # "(words)"
SQUARE_FACTOR = 1 / 1.1  # "[words]"
# The largest emphasis weight (in size, nesting multiplied in) that is read. Larger ones gave an all-black
# image without a word (measured on the tiny preset: a 40-digit weight, past float32's range, and 500 nested
# groups, x5e20, both did), and half precision overflows far sooner. Refused, not clamped: a clamped weight
# would silently draw another prompt than the one asked for. 100 is far past any useful emphasis (about
# 0.5..2), and 48 nested groups (x97) still pass.
MAX_WEIGHT = 100.0
# Blocks encoded per text-encoder call: bounds the hidden states kept for a 2000-character prompt
# (output_hidden_states holds every layer) without one call per block.
BLOCKS_PER_PASS = 8

# One piece of prompt syntax per match; together the alternatives cover every character.
_PIECE = re.compile(
    r"""
      \\[\\()\[\]]                                   # escaped bracket or backslash
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)        # ":1.3)" closes a round group with that weight
    | [()\[\]]                                       # a bracket
    | [^\\()\[\]:]+                                  # plain text
    | [\\:]                                          # a lone backslash or colon: plain text
    """,
    re.VERBOSE,
)

Span = tuple[str, float]


class TextEncoders(Protocol):
    """What the encoder needs from a pipeline: SDXL's two tokenizers and two text encoders."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


@dataclass(frozen=True)
class PromptEmbeds:
    """The four tensors diffusers' SDXL pipelines take instead of prompt strings (batch of one)."""

    prompt_embeds: torch.Tensor  # (1, 77 * blocks, width of encoder 1 + width of encoder 2)
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor  # (1, projection width of encoder 2)
    negative_pooled_prompt_embeds: torch.Tensor


@dataclass(frozen=True)
class WeightedTokens:
    """A text's token ids (no start or end token) and one emphasis weight per token."""

    ids: list[int]
    weights: list[float]


def parse_emphasis(text: str) -> list[Span]:
    """`text` as (text, weight) spans; neighbouring spans of equal weight are merged.

    "a (red:1.5) [old] car" -> ("a ", 1.0), ("red", 1.5), (" ", 1.0), ("old", 1 / 1.1), (" car", 1.0).
    """
    spans: list[list] = []  # [text, weight]; an opening bracket is a literal span until it is closed
    open_round: list[int] = []
    open_square: list[int] = []
    for match in _PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if len(piece) == 2 and piece[0] == "\\":
            spans.append([piece[1], 1.0])
        elif piece in ("(", "["):
            (open_round if piece == "(" else open_square).append(len(spans))
            spans.append([piece, 1.0])
        elif weight is not None and open_round:
            _close_group(spans, open_round.pop(), float(weight))
        elif piece == ")" and open_round:
            _close_group(spans, open_round.pop(), ROUND_FACTOR)
        elif piece == "]" and open_square:
            _close_group(spans, open_square.pop(), SQUARE_FACTOR)
        else:
            spans.append([piece, 1.0])
    merged: list[Span] = []
    for piece, weight in spans:
        if not piece:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def check_emphasis(text: str, name: str = "prompt") -> None:
    """Refuse a text (`name`: the parameter it came from) that holds an emphasis weight past MAX_WEIGHT."""
    for piece, weight in parse_emphasis(text):
        if not abs(weight) <= MAX_WEIGHT:  # `not <=`: an infinite weight too (a 400-digit number)
            raise InvalidParameter(
                name,
                piece.strip() or piece,
                f"its emphasis weight is {weight:.4g} (nested brackets multiply), outside "
                f"-{MAX_WEIGHT:g}..{MAX_WEIGHT:g}: use weights of about 0.5..2, e.g. (words:1.3)",
            )


def _close_group(spans: list[list], start: int, factor: float) -> None:
    # The opening bracket was kept as literal text in case it never closed; now it is syntax.
    spans[start][0] = ""
    for span in spans[start + 1 :]:
        span[1] *= factor


def weighted_tokens(tokenizer: CLIPTokenizer, text: str) -> WeightedTokens:
    """Token ids of `text` with their emphasis weights; spans are tokenized one by one, like the reference."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_emphasis(text):
        # verbose=False: a long prompt is not an error here, so no "longer than 77" warning either.
        piece_ids = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return WeightedTokens(ids, weights)


def blocks_needed(num_tokens: int, block: int) -> int:
    """Blocks for `num_tokens` text tokens; an empty text still takes one block (start, end, padding)."""
    return max(1, math.ceil(num_tokens / block))


def block_rows(
    tokens: WeightedTokens, num_blocks: int, row_length: int, tokenizer: CLIPTokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, weights, end positions): one row of `row_length` per block, padded as diffusers pads.

    Each row is start, up to `row_length - 2` tokens, end, then the tokenizer's pad token (the end
    token for SDXL's first tokenizer, "!" for its second). Blocks past the text are empty rows.
    """
    block = row_length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, weights, ends = [], [], []
    for i in range(num_blocks):
        chunk = tokens.ids[i * block : (i + 1) * block]
        chunk_weights = tokens.weights[i * block : (i + 1) * block]
        fill = block - len(chunk)
        ids.append([bos, *chunk, eos] + [pad] * fill)
        weights.append([1.0, *chunk_weights, 1.0] + [1.0] * fill)
        ends.append(len(chunk) + 1)
    return (
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
        torch.tensor(ends, dtype=torch.long),
    )


def encode_rows(
    encoder: CLIPTextModel | CLIPTextModelWithProjection, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(penultimate hidden states (blocks, length, width), pooled output (blocks, width) or None).

    The encoder call is diffusers' own (ids on the encoder's execution device, hidden states kept), so a
    single block gives exactly what `encode_prompt` gives.
    """
    device = get_module_execution_device(encoder)
    hidden, pooled = [], []
    for group in ids.split(BLOCKS_PER_PASS):
        out = encoder(group.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: its first output is the pooled projection
            pooled.append(out[0])
    return torch.cat(hidden), (torch.cat(pooled) if pooled else None)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Each weighted token moved along the line from its block's end-token embedding: end + (x - end) * w.

    Worked in float32 and cast back; tokens of weight 1 come back bit for bit.
    """
    changed = (weights != 1.0).to(hidden.device)
    if not bool(changed.any()):
        return hidden
    h = hidden.float()
    end = h[torch.arange(h.shape[0], device=h.device), ends.to(h.device)].unsqueeze(1)
    moved = end + (h - end) * weights.to(h.device).unsqueeze(-1)
    return torch.where(changed.unsqueeze(-1), moved, h).to(hidden.dtype)


def row_length(parts: TextEncoders) -> int:
    """Positions per block: what both tokenizers and both encoders accept (77 for SDXL)."""
    return min(
        parts.tokenizer.model_max_length,
        parts.tokenizer_2.model_max_length,
        parts.text_encoder.config.max_position_embeddings,
        parts.text_encoder_2.config.max_position_embeddings,
    )


def _encode_text(
    parts: TextEncoders, tokens: tuple[WeightedTokens, WeightedTokens], num_blocks: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One text through both encoders: (embeddings (1, blocks * length, width), pooled (1, width))."""
    per_encoder = []
    pooled: torch.Tensor | None = None
    pairs = ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2))
    for toks, (tokenizer, encoder) in zip(tokens, pairs, strict=True):
        ids, weights, ends = block_rows(toks, num_blocks, length, tokenizer)
        hidden, block_pooled = encode_rows(encoder, ids)
        hidden = apply_weights(hidden, weights, ends)
        per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
        if pooled is None and block_pooled is not None:
            # The last block holding this text's tokens (never a padding block added to match the other text).
            own = blocks_needed(len(toks.ids), length - 2)
            pooled = block_pooled[own - 1 : own]
    if pooled is None:
        raise ValueError("text_encoder_2 gave no pooled output: SDXL needs a CLIPTextModelWithProjection there.")
    return torch.concat(per_encoder, dim=-1), pooled


@torch.no_grad()
def encode_prompts(parts: TextEncoders, prompt: str, negative_prompt: str, device: torch.device) -> PromptEmbeds:
    """Prompt and negative prompt, any length, with emphasis, ready for an SDXL pipeline's `*_embeds=`.

    Both get as many blocks as the longer needs, so their embeddings line up for guidance. Embeddings
    end in text_encoder_2's dtype on `device`, as diffusers' `encode_prompt` leaves them.
    """
    check_emphasis(prompt, "prompt")
    check_emphasis(negative_prompt, "negative_prompt")
    length = row_length(parts)
    texts = (prompt, negative_prompt)
    tokens = [(weighted_tokens(parts.tokenizer, t), weighted_tokens(parts.tokenizer_2, t)) for t in texts]
    num_blocks = max(blocks_needed(len(tok.ids), length - 2) for pair in tokens for tok in pair)
    (embeds, pooled), (neg_embeds, neg_pooled) = (_encode_text(parts, pair, num_blocks, length) for pair in tokens)
    dtype = parts.text_encoder_2.dtype
    return PromptEmbeds(
        prompt_embeds=embeds.to(dtype=dtype, device=device),
        negative_prompt_embeds=neg_embeds.to(dtype=dtype, device=device),
        pooled_prompt_embeds=pooled.to(device),
        negative_pooled_prompt_embeds=neg_pooled.to(device),
    )
