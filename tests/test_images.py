"""instantid.vision.images against a hostile corpus generated at run time (no binary files are committed)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from instantid.errors import ImageError, UserError
from instantid.vision.images import image_to_array, load_image

MAX_BYTES = 25 * 2**20
MAX_PIXELS = 50_000_000


def load(source, **kw):
    kw.setdefault("max_bytes", MAX_BYTES)
    kw.setdefault("max_pixels", MAX_PIXELS)
    return load_image(source, **kw)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size=(200, 160), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares `width` x `height` RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + png_chunk(b"IEND", b"")
    )


# --- what goes wrong --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="face photo file 'nope.jpg' was not found"):
        load(tmp_path / "nope.jpg")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        load(str(tmp_path))


@pytest.mark.parametrize("kind", ["path", "bytes"])
def test_empty(tmp_path, kind):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"face photo is empty \(0 bytes\)"):
        load(path if kind == "path" else b"")


def test_too_many_bytes_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate(2**30)  # sparse: 1 GiB on paper, nothing on disk
    start = time.perf_counter()
    with pytest.raises(ImageError, match="is 1024 MB, over the 25 MB limit: upload a smaller or more compressed photo"):
        load(path)
    assert time.perf_counter() - start < 0.5


def test_too_many_bytes_as_bytes():
    data = encode(noise((300, 300)), "PNG")
    with pytest.raises(ImageError, match=r"face photo is \d+ KB, over the \d+ KB limit"):
        load(data, max_bytes=len(data) - 1)
    img, _ = load(data, max_bytes=len(data))
    assert img.size == (300, 300)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(seed):
    data = np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="face photo is not an image we can read: upload a JPEG, PNG or WebP"):
        load(data)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n" * 20)
    with pytest.raises(ImageError, match="not an image"):
        load(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated(fmt, keep):
    data = encode(noise((256, 256)), fmt)
    cut = data[: int(len(data) * keep)]
    with pytest.raises(ImageError, match="face photo could not be (decoded|read)"):
        load(cut)


def test_truncated_inside_header():
    data = encode(noise(), "PNG")[:20]
    with pytest.raises(ImageError, match="face photo"):
        load(data)


@pytest.mark.parametrize("fmt,name", [("PPM", "PPM"), ("TGA", "TGA"), ("ICO", "ICO")])
def test_unsupported_format(fmt, name):
    data = encode(noise((128, 128)), fmt)
    with pytest.raises(ImageError, match=f"face photo is a {name} file, which is not supported"):
        load(data)


def test_heic_is_named():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100
    with pytest.raises(ImageError, match="HEIC/HEIF photo, which is not supported: convert it to JPEG"):
        load(data)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="must be a file path"):
        load(12345)


@pytest.mark.parametrize(
    "url,kind",
    [
        ("data:image/png;base64,{b64}", "a data: URL"),
        (" DATA:image/png;base64,{b64}", "a data: URL"),
        ("https://example.com/face.png", "a URL"),
        ("file:///etc/passwd", "a URL"),
    ],
)
def test_a_url_is_refused_never_read_or_decoded(url, kind):
    """A data: URL holding a valid photo is still refused: it would be decoded before the byte limit applied."""
    import base64

    url = url.format(b64=base64.b64encode(encode(noise(), "PNG")).decode())
    with pytest.raises(ImageError, match=f"The face photo is {kind}, which is never read: send the photo itself"):
        load(url, max_bytes=10)


# --- decompression bombs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width,height,max_pixels",
    [
        (100_000, 100_000, MAX_PIXELS),  # PIL's own bomb guard fires first
        (100_000, 100_000, 10**12),  # our limit is above PIL's: PIL's error is reported the same way
        (9_000, 9_000, MAX_PIXELS),  # under PIL's guard, over ours
        (50_001, 1_000, MAX_PIXELS),
    ],
)
def test_bomb_is_refused_from_the_header(tmp_path, width, height, max_pixels):
    data = png_declaring(width, height)
    assert len(data) < 1000
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    for source in (data, path):
        start = time.perf_counter()
        with pytest.raises(ImageError, match="face photo is too large .*megapixels.*resize it"):
            load(source, max_pixels=max_pixels)
        assert time.perf_counter() - start < 1.0


def test_bomb_message_names_the_size():
    with pytest.raises(ImageError, match="9000 x 9000 pixels, 81 megapixels; the limit is 50 megapixels"):
        load(png_declaring(9_000, 9_000))


def test_pil_bomb_warning_is_refused(monkeypatch):
    # Between PIL's limit and twice it, PIL only warns; we refuse with the same message.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    data = encode(noise((120, 120)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        load(data, max_pixels=10**9)


def test_pixel_limit_applies_to_arrays_and_pil_images():
    arr = np.zeros((300, 300, 3), np.uint8)
    with pytest.raises(ImageError, match="too large"):
        load(arr, max_pixels=300 * 300 - 1)
    with pytest.raises(ImageError, match="too large"):
        load(Image.fromarray(arr), max_pixels=300 * 300 - 1)


# --- too small --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (63, 500), (500, 63), (10, 10)])
def test_too_small(size):
    data = encode(Image.new("RGB", size, (10, 20, 30)), "PNG")
    with pytest.raises(ImageError, match=rf"only {size[0]} x {size[1]} pixels.*at least 64 pixels"):
        load(data)


def test_smallest_accepted():
    img, notes = load(encode(Image.new("RGB", (64, 64), (10, 20, 30)), "PNG"))
    assert img.size == (64, 64) and notes == []


def test_what_is_named_in_messages():
    with pytest.raises(ImageError, match="pose photo"):
        load(b"", what="pose photo")
    with pytest.raises(ImageError, match="pose photo"):
        load(encode(Image.new("RGB", (8, 8)), "PNG"), what="pose photo")


def test_image_error_is_a_user_error():
    assert issubclass(ImageError, UserError)


# --- modes ------------------------------------------------------------------------------------------


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([0, 257, 1000, 32896, 50000, 65535], np.uint16)
    arr = np.repeat(np.tile(values, 11)[None, :64], 64, axis=0)
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    img, notes = load(encode(src, "PNG"))
    out = image_to_array(img)
    assert img.mode == "RGB" and out.shape == (64, 64, 3)
    expected = np.rint(arr.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    # PIL's own convert("L") clips: everything above 255 would be white.
    assert out[0, 2, 0] == 4 and out[0, 3, 0] == 128 and out[0, 5, 0] == 255
    assert notes == []


@pytest.mark.parametrize(
    "mode,values,expected",
    [
        ("I", [0, 65535, 32896], [0, 255, 128]),  # 16-bit range in a 32-bit image (older Pillow PNGs)
        ("I", [0, 100, 255], [0, 100, 255]),  # already 8-bit range
        ("I", [-1000, 0, 1000], [0, 128, 255]),  # no natural white point: stretched
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
        ("F", [0.0, 100.0, 255.0], [0, 100, 255]),
    ],
)
def test_high_depth_pil_modes(mode, values, expected):
    arr = np.repeat(np.repeat(np.array(values, np.float64)[None, :], 64, axis=0), 30, axis=1)
    src = Image.fromarray(arr.astype(np.int32 if mode == "I" else np.float32))
    assert src.mode == mode
    img, _ = load(src)
    out = image_to_array(img)
    assert [int(out[0, 30 * i, 0]) for i in range(3)] == expected


def test_palette_with_transparency_is_flattened_on_white():
    src = Image.new("P", (80, 80), 0)
    src.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    src.paste(1, (40, 0, 80, 80))
    data = encode(src, "PNG", transparency=1)
    img, notes = load(data)
    out = image_to_array(img)
    assert tuple(out[10, 10]) == (255, 0, 0)
    assert tuple(out[10, 70]) == (255, 255, 255)
    assert any("transparent" in n and "white" in n for n in notes)


def test_palette_without_transparency():
    src = Image.new("RGB", (80, 80), (0, 0, 255)).convert("P")
    img, notes = load(encode(src, "PNG"))
    assert tuple(image_to_array(img)[5, 5]) == (0, 0, 255) and notes == []


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_is_flattened_on_white_with_a_warning(fmt):
    arr = np.zeros((64, 96, 4), np.uint8)
    arr[:, :32] = (255, 0, 0, 0)  # fully transparent red -> white
    arr[:, 32:64] = (0, 0, 255, 255)  # opaque blue stays blue
    arr[:, 64:] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    data = encode(Image.fromarray(arr), fmt, lossless=True) if fmt == "WEBP" else encode(Image.fromarray(arr), fmt)
    img, notes = load(data)
    out = image_to_array(img).astype(int)
    assert tuple(out[10, 10]) == (255, 255, 255)
    assert tuple(out[10, 40]) == (0, 0, 255)
    assert all(abs(v - 127) <= 2 for v in out[10, 80])
    assert notes == ["The face photo has transparent areas; they were filled with white."]


def test_opaque_rgba_has_no_warning():
    arr = np.full((64, 64, 4), 255, np.uint8)
    arr[..., 0] = 10
    img, notes = load(arr)
    assert tuple(image_to_array(img)[0, 0]) == (10, 255, 255) and notes == []


def test_grayscale_with_alpha():
    src = Image.new("LA", (64, 64), (0, 0))
    src.paste((50, 255), (0, 0, 32, 64))
    img, notes = load(encode(src, "PNG"))
    out = image_to_array(img)
    assert tuple(out[5, 5]) == (50, 50, 50) and tuple(out[5, 50]) == (255, 255, 255)
    assert len(notes) == 1 and "white" in notes[0]


def test_cmyk_jpeg():
    src = Image.new("CMYK", (80, 80), (0, 255, 255, 0))  # pure red in print colours
    img, notes = load(encode(src, "JPEG", quality=95))
    r, g, b = (int(v) for v in image_to_array(img)[40, 40])
    assert img.mode == "RGB" and r > 220 and g < 40 and b < 40
    assert any("CMYK" in n for n in notes)


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grayscale(mode):
    src = Image.new(mode, (70, 70), 0)
    src.paste(255 if mode == "L" else 1, (35, 0, 70, 70))
    img, notes = load(encode(src, "PNG"))
    out = image_to_array(img)
    assert tuple(out[3, 3]) == (0, 0, 0) and tuple(out[3, 60]) == (255, 255, 255) and notes == []


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_uses_first_frame(fmt):
    frames = [Image.new("RGB", (80, 80), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    img, notes = load(data)
    r, g, b = (int(v) for v in image_to_array(img)[40, 40])
    assert r > 240 and g < 15 and b < 15
    assert notes == ["The face photo is animated; only its first frame is used."]


def test_single_frame_gif_has_no_warning():
    img, notes = load(encode(Image.new("RGB", (80, 80), (255, 0, 0)), "GIF"))
    assert notes == [] and img.size == (80, 80)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_applied(fmt):
    # Stored 200 wide x 100 high with a red block top-left; orientation 6 means "rotate 90 degrees clockwise
    # to display", so the photo comes out 100 x 200 with the block top-right.
    src = Image.new("RGB", (200, 100), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 60, 40))
    exif = src.getexif()
    exif[0x0112] = 6
    img, notes = load(encode(src, fmt, exif=exif.tobytes()))
    assert img.size == (100, 200)
    out = image_to_array(img).astype(int)
    assert out[10, 90, 0] > 200 and out[10, 90, 2] < 60  # red, top right
    assert out[190, 10, 2] > 200 and out[190, 10, 0] < 60  # blue, bottom left
    assert notes == []


# --- sources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "bytearray", "memoryview", "pil", "lazy_pil"])
def test_every_source_kind(tmp_path, kind):
    src = Image.new("RGB", (100, 80), (1, 2, 3))
    data = encode(src, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    source = {
        "str": str(path),
        "path": path,
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "pil": src,
        "lazy_pil": Image.open(io.BytesIO(data)),
    }[kind]
    img, notes = load(source)
    assert img.mode == "RGB" and img.size == (100, 80) and notes == []
    assert tuple(image_to_array(img)[0, 0]) == (1, 2, 3)


@pytest.mark.parametrize(
    "arr,expected",
    [
        (np.full((64, 70), 200, np.uint8), (200, 200, 200)),
        (np.full((64, 70, 1), 200, np.uint8), (200, 200, 200)),
        (np.tile(np.array([1, 2, 3], np.uint8), (64, 70, 1)), (1, 2, 3)),
        (np.tile(np.array([1, 2, 3, 255], np.uint8), (64, 70, 1)), (1, 2, 3)),
        (np.tile(np.array([0, 32896, 65535], np.uint16), (64, 70, 1)), (0, 128, 255)),
        (np.full((64, 70), 65535, np.uint16), (255, 255, 255)),
        (np.ones((64, 70), bool), (255, 255, 255)),
    ],
)
def test_arrays(arr, expected):
    img, _ = load(arr)
    assert img.size == (70, 64) and img.mode == "RGB"
    assert tuple(int(v) for v in image_to_array(img)[3, 3]) == expected


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((64, 64, 3), np.float32),
        np.zeros((64, 64, 3), np.int64),
        np.zeros((64, 64, 2), np.uint8),
        np.zeros((64, 64, 3, 1), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        np.zeros(64, np.uint8),
    ],
)
def test_bad_arrays(arr):
    with pytest.raises(ImageError, match="array has an unsupported shape"):
        load(arr)


# --- helpers ----------------------------------------------------------------------------------------


def test_image_to_array():
    arr = image_to_array(Image.new("L", (30, 20), 7))
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"] and arr.flags["WRITEABLE"]
    assert (arr == 7).all()


def test_large_photo_under_the_limit_is_accepted():
    img, notes = load(encode(Image.new("RGB", (4000, 3000), (5, 6, 7)), "JPEG"))
    assert img.size == (4000, 3000) and notes == []
