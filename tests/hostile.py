"""The hostile upload corpus, generated at run time (nothing binary is committed), and the app it attacks.

Every item of the hardening issue's upload list has a case here: empty, truncated and non-image files,
decompression bombs (declared and real), 1-pixel and very small images, faces too small to use, and the
awkward but legitimate photos (grayscale, palette, RGBA, CMYK, 16-bit, animated, EXIF-rotated, very large,
many faces). Each case says whether the app must accept it (and which warning it must give) or refuse it
(and which words the one-sentence refusal must contain). `test_hardening.py` checks every case once where
it is decided (the engine's decoding and face finding), and a few cases through each front end (the
engine's generation, the command line, the Gradio API).

Source photos: `skimage.data.astronaut()` (public domain) and insightface's bundled `t1.jpg` (6 faces).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

ACCEPT = "accept"
REFUSE = "refuse"

# The refusal sentences come from instantid.vision.images / instantid.vision.faces; tests match these fragments.
NOT_AN_IMAGE = "not an image we can read"
DAMAGED = "truncated or damaged"
TOO_LARGE = "too large"
NO_FACE = "No face found"


@dataclass(frozen=True)
class Case:
    """One hostile upload: how to make it, and what the app must do with it."""

    name: str
    suffix: str
    make: Callable[[], bytes]
    expect: str  # ACCEPT or REFUSE
    # REFUSE: a fragment of the error message. ACCEPT: a fragment of one warning ("" = none required).
    message: str = ""
    faces: int = 1  # ACCEPT: faces the engine must report
    landscape: bool | None = None  # ACCEPT: the automatic output size must follow the upright photo
    error: str = "ImageError"  # REFUSE: the UserError subclass the engine raises
    bomb: bool = False  # must be refused in well under a second

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.suffix}"

    @property
    def id(self) -> str:
        return self.name


# --- sources -------------------------------------------------------------------------------------


@cache
def astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


@cache
def group_photo() -> bytes:
    import insightface

    return (Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes()


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 40 + 100).astype(np.uint8))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --- refusals ------------------------------------------------------------------------------------


def declared_bomb_png() -> bytes:
    """A few hundred bytes whose header declares 100 000 x 100 000 pixels (30 GB decoded)."""
    return png(100_000, 100_000, 8, 2, zlib.compress(b"\x00" * 4096))


def real_bomb_png() -> bytes:
    """A valid 1-bit PNG of 30 000 x 30 000 zeros: about 110 KB that decodes to 900 megapixels (2.7 GB as RGB)."""
    side = 30_000
    row = b"\x00" * (1 + side // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    chunks = [z.compress(row * 1000) for _ in range(side // 1000)]
    chunks.append(z.flush())
    return png(side, side, 1, 0, b"".join(chunks))


def declared_bomb_gif() -> bytes:
    """A GIF whose logical screen is 65 535 x 65 535 (4.3 gigapixels) around a 1-pixel frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def truncated(fmt: str, keep: float) -> Callable[[], bytes]:
    def make() -> bytes:
        data = encode(astronaut(), fmt)
        return data[: int(len(data) * keep)]

    return make


def oversized() -> bytes:
    """A real JPEG followed by junk up to 26 MB: over the default 25 MB upload limit."""
    data = encode(astronaut(), "JPEG")
    return data + b"\x00" * (26 * 2**20 - len(data))


def face_too_small() -> bytes:
    """The astronaut shrunk so her face is about 24 pixels wide, on a plain 256-pixel canvas."""
    canvas = noise((256, 256), seed=3)
    canvas.paste(astronaut().resize((96, 96), Image.Resampling.LANCZOS), (80, 80))
    return encode(canvas, "PNG")


def animation(frames: list[Image.Image], fmt: str) -> bytes:
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


# --- awkward but legitimate photos ---------------------------------------------------------------


def rgba_cutout() -> bytes:
    """The astronaut with a transparent border, as a background-removal tool would export it."""
    rgba = astronaut().convert("RGBA")
    alpha = np.zeros((512, 512), np.uint8)
    alpha[24:-24, 24:-24] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return encode(rgba, "PNG")


def palette_with_transparency() -> bytes:
    pal = astronaut().convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    colors = pal.getpalette()[: 255 * 3]
    arr = np.array(pal)
    arr[:16, :] = 255  # a transparent band at the top, in the 256th palette slot
    out = Image.fromarray(arr, "P")
    out.putpalette(colors + [255, 255, 255] * (256 - len(colors) // 3))
    return encode(out, "PNG", transparency=255)


def gray16_png() -> bytes:
    arr = (np.asarray(astronaut().convert("L"), np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def rgb16_png() -> bytes:
    """A 48-bit RGB PNG (16 bits per channel, as photo editors export), written by hand: PIL cannot."""
    arr = np.asarray(astronaut(), np.uint16) * 257
    height, width = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(height))
    return png(width, height, 16, 2, zlib.compress(raw, 6))


def exif_rotated(orientation: int) -> Callable[[], bytes]:
    """A landscape crop stored sideways (portrait pixels) with the EXIF tag that turns it back upright."""

    def make() -> bytes:
        upright = astronaut().crop((0, 0, 512, 256))  # 2:1 landscape holding the face
        # Orientation 6 means "rotate 90 degrees clockwise to display", so store it turned the other way.
        stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[0x0112] = orientation
        return encode(stored, "JPEG", exif=exif.tobytes(), quality=92)

    return make


def very_large() -> bytes:
    """A 7000 x 5000 (35 megapixel) JPEG: under the 50 MP limit, so it must be accepted and downscaled."""
    big = Image.new("RGB", (7000, 5000), (120, 130, 140))
    big.paste(astronaut().resize((2400, 2400), Image.Resampling.BILINEAR), (2300, 1300))
    return encode(big, "JPEG", quality=80)


def strip_png() -> bytes:
    """64 x 200000 pixels: under the megapixel limit, a shape no face photo has (OpenCV asserted on it)."""
    return encode(Image.new("RGB", (64, 200_000), (120, 130, 140)), "PNG")


def metadata_bomb_png() -> bytes:
    """A good photo whose text chunk inflates from a few KB to 64 MB, past PIL's metadata limit."""
    photo = encode(astronaut().resize((256, 256)), "PNG")
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (64 * 2**20), 9))
    return photo[:33] + ztxt + photo[33:]  # right after the 33-byte signature + IHDR


def rgba16_huge_png(side: int = 7000) -> bytes:
    """A 16-bit RGBA PNG of 49 megapixels in a few hundred KB: cheap to send, costly to decode."""
    row = b"\x00" + b"\x80\x00" * 4 * side
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png(side, side, 16, 6, idat)


def cmyk_jpeg() -> bytes:
    return encode(astronaut().convert("CMYK"), "JPEG", quality=92)


CASES: list[Case] = [
    # Files that are not (usable) images.
    Case("empty", "png", lambda: b"", REFUSE, "empty (0 bytes)"),
    Case("text", "png", lambda: b"hello, this is a text file with an image extension\n", REFUSE, NOT_AN_IMAGE),
    Case("html", "jpg", lambda: b"<!doctype html><script>alert(1)</script>", REFUSE, NOT_AN_IMAGE),
    Case("random_bytes", "jpg", lambda: np.random.default_rng(1).bytes(4096), REFUSE, NOT_AN_IMAGE),
    Case("pdf", "png", lambda: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", REFUSE, NOT_AN_IMAGE),
    Case(
        "svg",
        "svg",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512"><script>alert(1)</script></svg>',
        REFUSE,
        NOT_AN_IMAGE,
    ),
    Case("heic", "heic", lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, REFUSE, "HEIC"),
    Case("ico", "ico", lambda: encode(astronaut().resize((64, 64)), "ICO"), REFUSE, "not supported"),
    Case("truncated_jpeg", "jpg", truncated("JPEG", 0.5), REFUSE, DAMAGED),
    Case("truncated_png", "png", truncated("PNG", 0.5), REFUSE, DAMAGED),
    Case("truncated_header", "png", lambda: encode(astronaut(), "PNG")[:20], REFUSE, "could not be read"),
    Case("oversized_bytes", "jpg", oversized, REFUSE, "over the 25 MB limit"),
    # Decompression bombs: refused from the header, before any pixel is decoded.
    Case("bomb_declared_png", "png", declared_bomb_png, REFUSE, TOO_LARGE, bomb=True),
    Case("bomb_real_png", "png", real_bomb_png, REFUSE, TOO_LARGE, bomb=True),
    Case("bomb_declared_gif", "gif", declared_bomb_gif, REFUSE, TOO_LARGE, bomb=True),
    # Too small to hold a usable face.
    Case("one_pixel", "png", lambda: encode(Image.new("RGB", (1, 1), (200, 150, 120)), "PNG"), REFUSE, "1 x 1"),
    Case("thumbnail", "jpg", lambda: encode(astronaut().resize((48, 48)), "JPEG"), REFUSE, "48 x 48"),
    Case("sliver", "png", lambda: encode(astronaut().resize((2000, 10)), "PNG"), REFUSE, "2000 x 10"),
    Case("strip", "png", strip_png, REFUSE, "one side more than 20 times the other"),
    Case("metadata_bomb", "png", metadata_bomb_png, REFUSE, "metadata block that inflates", bomb=True),
    Case("rgba16_huge", "png", rgba16_huge_png, REFUSE, NO_FACE, error="NoFaceError"),
    Case("face_too_small", "png", face_too_small, REFUSE, "too small", error="NoFaceError"),
    Case("no_face", "png", lambda: encode(noise((256, 256)), "PNG"), REFUSE, NO_FACE, error="NoFaceError"),
    # Only the first frame of an animation counts: here it holds no face.
    Case(
        "animated_face_second",
        "gif",
        lambda: animation([noise((512, 512)), astronaut()], "GIF"),
        REFUSE,
        NO_FACE,
        error="NoFaceError",
    ),
    # Awkward but legitimate: accepted, with a warning where something was changed.
    Case("grayscale", "jpg", lambda: encode(astronaut().convert("L"), "JPEG"), ACCEPT),
    Case("palette", "png", lambda: encode(astronaut().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), ACCEPT),
    Case("palette_transparent", "png", palette_with_transparency, ACCEPT, "filled with white"),
    Case("rgba", "png", rgba_cutout, ACCEPT, "filled with white"),
    Case("gray_alpha", "png", lambda: encode(astronaut().convert("LA"), "PNG"), ACCEPT),
    Case("cmyk", "jpg", cmyk_jpeg, ACCEPT, "CMYK"),
    Case("gray16", "png", gray16_png, ACCEPT),
    Case("rgb16", "png", rgb16_png, ACCEPT),
    Case("animated_gif", "gif", lambda: animation([astronaut(), noise((512, 512))], "GIF"), ACCEPT, "first frame"),
    Case("animated_png", "png", lambda: animation([astronaut(), noise((512, 512))], "PNG"), ACCEPT, "first frame"),
    Case("animated_webp", "webp", lambda: animation([astronaut(), noise((512, 512))], "WEBP"), ACCEPT, "first frame"),
    Case("exif_rotate_6", "jpg", exif_rotated(6), ACCEPT, landscape=True),
    Case("exif_rotate_8", "jpg", exif_rotated(8), ACCEPT, landscape=True),
    Case("progressive_jpeg", "jpg", lambda: encode(astronaut(), "JPEG", progressive=True), ACCEPT),
    Case("webp", "webp", lambda: encode(astronaut(), "WEBP", quality=80), ACCEPT),
    Case("bmp", "bmp", lambda: encode(astronaut(), "BMP"), ACCEPT),
    Case("tiff", "tif", lambda: encode(astronaut(), "TIFF"), ACCEPT),
    Case("very_large", "jpg", very_large, ACCEPT),
    Case("many_faces", "jpg", group_photo, ACCEPT, "Found 6 faces", faces=6),
]

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
REFUSED = [c for c in CASES if c.expect == REFUSE]
ACCEPTED = [c for c in CASES if c.expect == ACCEPT]


def build_corpus(folder: Path) -> dict[str, Path]:
    """Write every case into `folder`; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in CASES:
        path = folder / case.filename
        path.write_bytes(case.make())
        paths[case.name] = path
    return paths
