"""Prompts of any length with emphasis (prompts.py): syntax, blocks, weights, and through the engine.

Two tokenizers: the tiny preset's byte-level one (one token per character, on the real tiny pipeline),
and CLIP's real BPE tokenizer built from the vocabulary the open-clip-torch wheel ships, on tiny text
encoders with CLIP's vocabulary size, for realistic token counts and SDXL's "!" padding of tokenizer_2.
"""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instantid.declaration import MAX_PROMPT_CHARS
from instantid.errors import InvalidParameter
from instantid.models.prompts import (
    MAX_WEIGHT,
    PromptEmbeds,
    WeightedTokens,
    block_rows,
    encode_prompts,
    parse_emphasis,
    weighted_tokens,
)
from instantid.request.requests import Request

CPU = torch.device("cpu")
OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_CACHE = Path.home() / ".cache" / "instantid" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 48894  # merge lines CLIP's vocabulary uses, after the header line


def as_tuple(e: PromptEmbeds) -> tuple[torch.Tensor, ...]:
    return (e.prompt_embeds, e.negative_prompt_embeds, e.pooled_prompt_embeds, e.negative_pooled_prompt_embeds)


def diffusers_encode(pipe, prompt: str, negative: str) -> tuple[torch.Tensor, ...]:
    """Today's path: diffusers' own SDXL encode_prompt (reads 77 tokens)."""
    return tuple(
        pipe.encode_prompt(
            prompt, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative
        )
    )


def prefix_with_tokens(tokenizer, words: list[str], count: int) -> str:
    """The longest run of `words` from the start whose tokens number exactly `count`."""
    for n in range(len(words), 0, -1):
        text = " ".join(words[:n])
        if len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) == count:
            return text
    raise AssertionError(f"no prefix of {count} tokens")


# --- the syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spans"),
    [
        ("a plain prompt, no syntax", [("a plain prompt, no syntax", 1.0)]),
        ("", [("", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("a [quiet] word", [("a ", 1.0), ("quiet", 1 / 1.1), (" word", 1.0)]),
        ("a (red:1.5) car", [("a ", 1.0), ("red", 1.5), (" car", 1.0)]),
        ("a (red : 0.5) car", [("a ", 1.0), ("red ", 0.5), (" car", 1.0)]),
        ("((nested))", [("nested", 1.1 * 1.1)]),
        ("((house:1.3))", [("house", 1.3 * 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (r"\(literal\] and \\", [("(literal] and \\", 1.0)]),
        # Unbalanced brackets are text, never an error, and weigh nothing.
        ("(a cat", [("(a cat", 1.0)]),
        ("a cat)", [("a cat)", 1.0)]),
        ("a] (b", [("a] (b", 1.0)]),
        ("((a)", [("(", 1.0), ("a", 1.1)]),
        ("(a]", [("(a]", 1.0)]),
        ("time: 12:30 (x:1.2.3)", [("time: 12:30 ", 1.0), ("x:1.2.3", 1.1)]),
        ("a:1.2) b", [("a:1.2) b", 1.0)]),
        ("lone \\ backslash", [("lone \\ backslash", 1.0)]),
    ],
)
def test_parse_emphasis(text: str, spans: list[tuple[str, float]]) -> None:
    got = parse_emphasis(text)
    assert [s for s, _ in got] == [s for s, _ in spans]
    assert [w for _, w in got] == pytest.approx([w for _, w in spans])


def test_every_character_of_a_plain_prompt_survives() -> None:
    text = "portrait, 35mm: f/1.8; \"quoted\" 'x' {braces} <angle> é 宇航员 👩🏽‍🚀 a\\b"
    assert parse_emphasis(text) == [(text, 1.0)]


def test_block_rows_pad_like_diffusers() -> None:
    tok = SimpleNamespace(bos_token_id=100, eos_token_id=101, pad_token_id=0)
    ids, weights, ends = block_rows(WeightedTokens([1, 2, 3, 4, 5], [1, 1, 2, 1, 1]), 3, 6, tok)  # 4 per block
    assert ids.tolist() == [[100, 1, 2, 3, 4, 101], [100, 5, 101, 0, 0, 0], [100, 101, 0, 0, 0, 0]]
    assert weights.tolist() == [[1, 1, 1, 2, 1, 1], [1] * 6, [1] * 6]
    assert ends.tolist() == [5, 2, 1]


# --- the tiny preset's pipeline -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return tiny_engine.pipe


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a portrait photo of a person", ""),
        ("a cat on a mat", "blurry, lowres, watermark"),
        ("", ""),
        ("x" * 75, "y" * 75),  # 75 byte tokens: the most one block holds
        ("unicode 宇航员 and emoji 👩🏽‍🚀", "\\ and : and , alone"),
    ],
)
def test_short_plain_prompts_keep_todays_embeddings_bit_for_bit(pipe, prompt: str, negative: str) -> None:
    ours = as_tuple(encode_prompts(pipe, prompt, negative, CPU))
    for mine, theirs in zip(ours, diffusers_encode(pipe, prompt, negative), strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def test_a_weight_changes_exactly_its_tokens(pipe) -> None:
    plain = encode_prompts(pipe, "a photo of a cat on a mat", "", CPU)
    weighted = encode_prompts(pipe, "a photo of a (cat:1.5) on a mat", "", CPU)
    ids = weighted_tokens(pipe.tokenizer, "a photo of a (cat:1.5) on a mat")
    assert ids.ids == weighted_tokens(pipe.tokenizer, "a photo of a cat on a mat").ids
    cat = {i + 1 for i, w in enumerate(ids.weights) if w == 1.5}  # +1: the start token
    assert len(cat) == 3  # "c", "a", "t</w>" in the byte-level vocabulary
    a, b = plain.prompt_embeds[0], weighted.prompt_embeds[0]
    changed = {i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])}
    assert changed == cat
    # end + (token - end) * weight, with the end token closing the text (a causal encoder: padding-free).
    end = a[len(ids.ids) + 1]
    for i in cat:
        torch.testing.assert_close(b[i], end + (a[i] - end) * 1.5)
    # The pooled embedding and the negative side are the encoders' own, untouched by weights.
    assert torch.equal(plain.pooled_prompt_embeds, weighted.pooled_prompt_embeds)
    assert torch.equal(plain.negative_prompt_embeds, weighted.negative_prompt_embeds)


def test_brackets_without_partners_are_read_as_text(pipe) -> None:
    literal = encode_prompts(pipe, "(a cat", "", CPU)
    escaped = encode_prompts(pipe, r"\(a cat", "", CPU)
    assert literal.prompt_embeds.shape == (1, 77, 64)
    assert torch.equal(literal.prompt_embeds, escaped.prompt_embeds)
    # ...and the bracket is part of what the encoders read: not the same as "a cat".
    assert not torch.equal(literal.prompt_embeds, encode_prompts(pipe, "a cat", "", CPU).prompt_embeds)
    assert weighted_tokens(pipe.tokenizer, "(a cat").ids == pipe.tokenizer("(a cat", add_special_tokens=False).input_ids


@pytest.mark.parametrize("longer", ["prompt", "negative"])
def test_prompt_and_negative_get_the_same_number_of_blocks(pipe, longer: str) -> None:
    long_text, short_text = "w" * 200, "short one"  # 200 byte tokens: three blocks
    prompt, negative = (long_text, short_text) if longer == "prompt" else (short_text, long_text)
    e = encode_prompts(pipe, prompt, negative, CPU)
    assert e.prompt_embeds.shape == e.negative_prompt_embeds.shape == (1, 3 * 77, 64)
    short_side = e.negative_prompt_embeds if longer == "prompt" else e.prompt_embeds
    alone = encode_prompts(pipe, short_text, "", CPU).prompt_embeds
    empty = encode_prompts(pipe, "", "", CPU).prompt_embeds
    # The short text's own block first, then blocks of nothing (start, end, padding).
    torch.testing.assert_close(short_side[:, :77], alone, rtol=0, atol=1e-6)
    for block in (1, 2):
        torch.testing.assert_close(short_side[:, 77 * block : 77 * (block + 1)], empty, rtol=0, atol=1e-6)


def test_blocks_of_75_tokens_each(pipe) -> None:
    for tokens, blocks in ((75, 1), (76, 2), (150, 2), (151, 3)):
        e = encode_prompts(pipe, "q" * tokens, "", CPU)
        assert e.prompt_embeds.shape[1] == 77 * blocks, tokens
    # A long prompt's first block is exactly its first 75 tokens, alone.
    long = encode_prompts(pipe, "q " * 75 + "z " * 80, "", CPU).prompt_embeds  # "q </w>": one token a word
    head = encode_prompts(pipe, "q " * 75, "", CPU).prompt_embeds
    torch.testing.assert_close(long[:, :77], head, rtol=0, atol=1e-6)


def test_a_prompt_of_2000_characters_is_read_in_full(pipe) -> None:
    text = ("a detailed portrait, " * 200)[:MAX_PROMPT_CHARS]
    tokens = len(weighted_tokens(pipe.tokenizer, text).ids)
    e = encode_prompts(pipe, text, "", CPU)
    assert e.prompt_embeds.shape == (1, 77 * math.ceil(tokens / 75), 64)
    assert torch.isfinite(e.prompt_embeds).all()


# --- through the engine ----------------------------------------------------------------------------


def generate(engine, photos, prompt: str, **kw):
    kw.setdefault("num_steps", 2)
    request = Request(face_images=[photos["astronaut"]], prompt=prompt, seed=5, **kw)
    result = engine.run(request)
    return result, np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_a_300_token_prompt_changes_the_image_against_its_first_77(tiny_engine, photos) -> None:
    words = [f"word{i % 10}" for i in range(80)]  # 5 byte tokens each
    tok = tiny_engine.pipe.tokenizer
    long = prefix_with_tokens(tok, words, 300)
    head = prefix_with_tokens(tok, words, 75)  # what the encoders read before: start + 75 + end = 77
    r_long, long_pixels = generate(tiny_engine, photos, long)
    r_head, head_pixels = generate(tiny_engine, photos, head)
    assert not np.array_equal(long_pixels, head_pixels)
    # Nothing is cut, so nothing is warned about.
    assert not r_long.warnings and not r_head.warnings


@pytest.mark.parametrize(
    "mode",
    [{}, {"enable_lcm": True}, {"controlnets": {"canny": 0.8}}, {"num_images": 2}],
    ids=["default", "lcm", "extra-controlnet", "two-images"],
)
def test_every_mode_reads_long_weighted_prompts(tiny_engine, photos, mode: dict) -> None:
    long = "a (very:1.3) detailed [portrait] photo, " * 12  # about 330 byte tokens
    negative = "(blurry:1.4), " * 30
    result, pixels = generate(tiny_engine, photos, long, negative_prompt=negative, **mode)
    assert not result.warnings
    assert len(result.images) == mode.get("num_images", 1)
    _, plain = generate(tiny_engine, photos, long.replace("(very:1.3)", "very"), negative_prompt=negative, **mode)
    assert not np.array_equal(pixels, plain)  # the weight reached the image


HUGE_WEIGHTS = {
    "forty_digits": "a portrait, (red hair:" + "9" * 40 + ")",  # past float32's range
    "nested_500": "a portrait, " + "(" * 500 + "red hair" + ")" * 500,  # 1.1 ** 500 = 5e20
    "just_past": "a portrait, (red hair:100.5)",
    "negative_weight": "a portrait, ((red hair:-95))",
}


@pytest.mark.parametrize("name", list(HUGE_WEIGHTS))
def test_a_weight_out_of_range_is_refused_naming_the_text(tiny_engine, photos, name: str) -> None:
    """Such a weight once gave an all-black image and no word: it is refused, before any photo is decoded."""
    text = HUGE_WEIGHTS[name]
    refused = r"Invalid prompt='red hair': its emphasis weight is .* outside -100..100"
    with pytest.raises(InvalidParameter, match=refused):
        generate(tiny_engine, photos, text)
    with pytest.raises(InvalidParameter, match=r"Invalid negative_prompt='red hair'"):
        generate(tiny_engine, photos, "a portrait", negative_prompt=text)
    with pytest.raises(InvalidParameter, match="Invalid prompt="):  # the pipeline's own gate, for direct callers
        encode_prompts(tiny_engine.pipe, text, "", CPU)


def test_the_largest_weights_allowed_still_draw(tiny_engine, photos) -> None:
    """At the limit (and 48 nested groups, x97) the embeddings stay finite and the image is not black."""
    for text in (f"a portrait, (red hair:{MAX_WEIGHT:g})", "a portrait, " + "(" * 48 + "red hair" + ")" * 48):
        embeds = encode_prompts(tiny_engine.pipe, text, f"(blurry:-{MAX_WEIGHT:g})", CPU)
        assert all(bool(torch.isfinite(t).all()) for t in as_tuple(embeds))
        _, pixels = generate(tiny_engine, photos, text)
        assert pixels.max() > 0


# --- CLIP's real tokenizer ---------------------------------------------------------------------------


def _clip_bpe(tmp: Path) -> Path:
    """CLIP's BPE merges from the open-clip-torch wheel (downloaded once, never installed)."""
    if BPE_CACHE.is_file():
        return BPE_CACHE
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", OPEN_CLIP_WHEEL, "-d", str(tmp)],
            check=True,
            capture_output=True,
            timeout=180,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"CLIP's vocabulary is not cached and {OPEN_CLIP_WHEEL} could not be downloaded: {exc}")
    wheel = next(tmp.glob("open_clip_torch-*.whl"))
    BPE_CACHE.parent.mkdir(parents=True, exist_ok=True)
    part = BPE_CACHE.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(BPE_MEMBER) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
    part.replace(BPE_CACHE)  # whole or absent, even with two sessions at once
    return BPE_CACHE


@pytest.fixture(scope="module")
def clip_parts(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """SDXL's two real tokenizers (end-token padding, "!" padding) on tiny encoders of CLIP's vocabulary."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tmp = tmp_path_factory.mktemp("clip")
    lines = gzip.decompress(_clip_bpe(tmp).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]
    chars = list(bytes_to_unicode().values())
    names = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    vocab = {name: i for i, name in enumerate(names)}
    tok1 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    # Public CLIP ids: the vocabulary is the real one.
    assert tok1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]

    def encoder(cls, seed: int):
        torch.manual_seed(seed)
        # SDXL's own text-encoder configs keep the legacy ids (bos 0, eos 2, pad 1): pooled by argmax.
        cfg = CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
        return cls(cfg).eval()

    pipe = StableDiffusionXLPipeline(
        vae=None,
        unet=None,
        scheduler=None,
        tokenizer=tok1,
        tokenizer_2=tok2,
        text_encoder=encoder(CLIPTextModel, 0),
        text_encoder_2=encoder(CLIPTextModelWithProjection, 1),
    )
    return SimpleNamespace(pipe=pipe, tokenizer=tok1)


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [("a portrait photo of a woman, detailed skin", "blurry, lowres"), ("", ""), ("hello!! world!!!!", "ugly")],
)
def test_real_clip_short_prompts_bit_for_bit(clip_parts, prompt: str, negative: str) -> None:
    ours = as_tuple(encode_prompts(clip_parts.pipe, prompt, negative, CPU))
    for mine, theirs in zip(ours, diffusers_encode(clip_parts.pipe, prompt, negative), strict=True):
        assert torch.equal(mine, theirs)


def test_real_clip_300_tokens_are_four_blocks(clip_parts) -> None:
    phrase = "a photo of a cat, "  # six CLIP tokens
    tok = clip_parts.tokenizer
    assert len(weighted_tokens(tok, phrase * 50).ids) == 300
    e = encode_prompts(clip_parts.pipe, phrase * 50, "lowres", CPU)
    assert e.prompt_embeds.shape == e.negative_prompt_embeds.shape == (1, 4 * 77, 64)
    assert encode_prompts(clip_parts.pipe, phrase * 50 + "dog", "", CPU).prompt_embeds.shape[1] == 5 * 77
    # The first block is the first 75 tokens alone.
    head = prefix_with_tokens(tok, (phrase * 50).split(" "), 75)
    alone = encode_prompts(clip_parts.pipe, head, "", CPU)
    torch.testing.assert_close(e.prompt_embeds[:, :77], alone.prompt_embeds, rtol=0, atol=1e-6)


def test_real_clip_pooled_output_is_the_texts_own_last_block(clip_parts) -> None:
    first = ("a photo of a cat, " * 12 + "a photo of").strip()  # exactly one block: 75 tokens
    assert len(weighted_tokens(clip_parts.tokenizer, first).ids) == 75
    e = encode_prompts(clip_parts.pipe, first + " a dog on a mat", "lowres, blurry", CPU)
    last = encode_prompts(clip_parts.pipe, "a dog on a mat", "lowres, blurry", CPU)
    assert e.prompt_embeds.shape[1] == 2 * 77
    torch.testing.assert_close(e.pooled_prompt_embeds, last.pooled_prompt_embeds, rtol=0, atol=1e-6)
    assert not torch.equal(e.pooled_prompt_embeds, encode_prompts(clip_parts.pipe, first, "", CPU).pooled_prompt_embeds)
    # The short negative prompt gains an empty second block; its pooled output stays its own, as when alone.
    torch.testing.assert_close(e.negative_pooled_prompt_embeds, last.negative_pooled_prompt_embeds, rtol=0, atol=1e-6)
