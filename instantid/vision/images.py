"""Decoding untrusted image uploads into plain RGB images.

Everything a person (or an API client) hands us goes through `load_image` before any model sees it.
Uploads are hostile by default: empty or truncated files, files that are not images, decompression
bombs that declare billions of pixels in a few hundred bytes, and the long tail of legitimate but
awkward photos (16-bit scans, palette PNGs with transparency, CMYK JPEGs from print workflows,
phone photos that rely on EXIF orientation, animated GIFs). Every refusal is an `ImageError` whose
message says what to do, so the UI can show it as is.

No torch here: the UI and the command line import this module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..errors import ImageError

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray

MIN_SIDE = 64
# No face photo is a strip: past 20:1 the face detector's letterbox would squeeze the short side to a few
# pixels (64 x 200000 made OpenCV assert inside it).
MAX_ASPECT = 20

# Formats people actually upload photos in. Restricting PIL to these keeps exotic decoders (EPS would
# even shell out to Ghostscript) away from untrusted bytes. MPO is how PIL names multi-picture JPEGs
# from phones and cameras; it is opened by the JPEG plugin.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "MPO")
_ALLOWED_HINT = "upload a JPEG, PNG or WebP photo"
# Formats whose multi-frame files are animations; other multi-frame formats (MPO depth maps, TIFF
# pages) are silently reduced to their first frame.
_ANIMATED_FORMATS = ("GIF", "PNG", "WEBP", "AVIF")
_HIGH_DEPTH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_WHITE = (255, 255, 255)
# A string that is a URL (data:, http://, file:// ...), not a path: refused by `load_image`, never opened.
_URL = re.compile(r"^\s*(data:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def load_image(
    source: ImageSource,
    *,
    max_bytes: int,
    max_pixels: int,
    what: str = "face photo",
) -> tuple[Image.Image, list[str]]:
    """Decode `source` into an RGB PIL image, refusing anything unsafe or unusable.

    `source` is a path, the file's bytes, a PIL image or a numpy array (HxW, HxWx3 or HxWx4, uint8 or
    uint16). Returns the image and a list of human-readable warnings (animation dropped, transparency
    flattened onto white, colour conversion). Raises `ImageError` with a sentence naming `what`.
    """
    notes: list[str] = []
    if isinstance(source, np.ndarray):
        img = _array_to_image(source, what)
        _check_dimensions(img.size, max_pixels, what)
        return _to_rgb(img, what, notes), notes
    if isinstance(source, Image.Image):
        # A caller's own PIL image may still be lazy (opened, not decoded), so the header checks run
        # before the decode just as for files.
        _check_dimensions(source.size, max_pixels, what)
        return _decode(source, what, notes), notes
    if isinstance(source, str) and _URL.match(source):
        # Never fetched or decoded: a data: URL would be decoded before the byte limit could apply.
        kind = "a data: URL" if source.lstrip().lower().startswith("data:") else "a URL"
        raise ImageError(
            f"The {what} is {kind}, which is never read: send the photo itself as an upload "
            "(gradio_client: handle_file(path)) or a file path."
        )
    if isinstance(source, (str, Path)):
        data = _read_file(Path(source), max_bytes, what)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_byte_count(len(data), max_bytes, what)
    else:
        raise ImageError(
            f"The {what} must be a file path, file bytes, a PIL image or a numpy array, "
            f"not {type(source).__name__}: upload the photo again."
        )
    img = _open(data, max_pixels, what)
    try:
        _check_dimensions(img.size, max_pixels, what)
        return _decode(img, what, notes), notes
    finally:
        img.close()


def release_memory() -> None:
    """Hand freed memory back to the operating system (glibc; a no-op elsewhere).

    Decoding a large photo allocates hundreds of MB in the worker thread that serves the request; glibc
    keeps what such a thread frees in that thread's own arena, so without this each large upload, even a
    refused one, left the process 0.6-1.5 GB bigger (measured: +1.47 GB after five 49-megapixel uploads in
    five threads, +20 MB with this call after each).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def image_to_array(img: Image.Image) -> np.ndarray:
    """An RGB uint8 (height, width, 3) C-contiguous, writable array of `img`."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.array(img, dtype=np.uint8))


# --- reading and opening ---------------------------------------------------------------------------


def _size_text(count: int) -> str:
    if count < 2**20:
        return f"{max(1, round(count / 1024))} KB"
    mb = count / 2**20
    return f"{mb:.0f} MB" if mb >= 10 or mb == int(mb) else f"{mb:.1f} MB"


def _check_byte_count(count: int, max_bytes: int, what: str) -> None:
    if count == 0:
        raise ImageError(f"The {what} is empty (0 bytes): upload the photo again.")
    if count > max_bytes:
        raise ImageError(
            f"The {what} is {_size_text(count)}, over the {_size_text(max_bytes)} limit: "
            "upload a smaller or more compressed photo."
        )


def _read_file(path: Path, max_bytes: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageError(f"The {what} file {path.name!r} was not found: upload the photo again.") from None
    if not path.is_file():
        raise ImageError(f"The {what} path {path.name!r} is not a file: upload the photo again.")
    # Checked before reading, so an oversized upload never lands in memory.
    _check_byte_count(size, max_bytes, what)
    try:
        with open(path, "rb") as f:
            # One byte more than allowed catches a file that grew after stat().
            data = f.read(max_bytes + 1)
    except OSError as exc:
        reason = exc.strerror or exc
        raise ImageError(f"The {what} file could not be read ({reason}): upload the photo again.") from None
    _check_byte_count(len(data), max_bytes, what)
    return data


def _bomb_error(what: str, size: tuple[int, int] | None, limit: int) -> ImageError:
    shown = f"{size[0]} x {size[1]} pixels, " if size else ""
    mp = f"{size[0] * size[1] / 1e6:.0f} megapixels; " if size else ""
    return ImageError(
        f"The {what} is too large ({shown}{mp}the limit is {limit / 1e6:.0f} megapixels): "
        "resize it and upload it again."
    )


def _pil_limit(max_pixels: int) -> int:
    # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; either is reported as our limit.
    pil = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pil) if pil else max_pixels


def _open(data: bytes, max_pixels: int, what: str) -> Image.Image:
    """Identify the image from its header only; PIL's open() does not decode pixels."""
    Image.init()
    allowed = [f for f in ALLOWED_FORMATS if f in Image.OPEN]
    try:
        # PIL signals declared sizes just above its own limit with a warning only: make it an error
        # here. catch_warnings is not thread-safe, but the worst a race can do is leave this very
        # filter installed, which is the behaviour we want anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=allowed)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb_error(what, None, _pil_limit(max_pixels)) from None
    except UnidentifiedImageError:
        pass
    except ValueError as exc:
        if "Decompressed" in str(exc):
            # PIL refuses a compressed metadata chunk (text, ICC profile) that inflates past its limit.
            raise ImageError(
                f"The {what} carries a metadata block that inflates to more than PIL's limit of "
                f"{_size_text(PngImagePlugin.MAX_TEXT_CHUNK)}: save the photo again without metadata and upload it."
            ) from None
        raise ImageError(
            f"The {what} could not be read (the file is damaged or not an image): {_ALLOWED_HINT}."
        ) from None
    except Exception:  # header parsers of hostile files raise all sorts of things
        raise ImageError(
            f"The {what} could not be read (the file is damaged or not an image): {_ALLOWED_HINT}."
        ) from None
    raise _unidentified(data, what)


def _unidentified(data: bytes, what: str) -> ImageError:
    # iPhones default to HEIC, which PIL cannot read without a plugin: say so instead of "not an image".
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return ImageError(
            f"The {what} is a HEIC/HEIF photo, which is not supported: convert it to JPEG or PNG and upload it again."
        )
    fmt = None
    try:
        # Header-only identification to name the format in the message; nothing is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
    except Exception:  # any failure just means "not an image"
        fmt = None
    if fmt:
        return ImageError(f"The {what} is a {fmt} file, which is not supported: {_ALLOWED_HINT}.")
    return ImageError(f"The {what} is not an image we can read: {_ALLOWED_HINT}.")


def _check_dimensions(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise _bomb_error(what, (width, height), max_pixels)
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The {what} is only {width} x {height} pixels: use a photo that is at least {MIN_SIDE} pixels "
            "on each side."
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"The {what} is {width} x {height} pixels, one side more than {MAX_ASPECT} times the other: no "
            "face photo has that shape; crop it around the face and upload it again."
        )


# --- decoding ------------------------------------------------------------------------------------


def _decode(img: Image.Image, what: str, notes: list[str]) -> Image.Image:
    if img.format in _ANIMATED_FORMATS and getattr(img, "is_animated", False):
        notes.append(f"The {what} is animated; only its first frame is used.")
        img.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Forces the full decode now, so truncation surfaces here and not deep inside a model.
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb_error(what, img.size, _pil_limit(img.size[0] * img.size[1])) from None
    except Exception:  # decoders of damaged files raise OSError, SyntaxError, zlib errors...
        raise ImageError(
            f"The {what} could not be decoded (the file is truncated or damaged): upload the original photo again."
        ) from None
    try:
        # Phones store portraits sideways plus an orientation tag; faces must be upright for detection.
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not make a good photo unusable
        notes.append(f"The {what} has unreadable orientation data; it is used as stored.")
    return _to_rgb(img, what, notes)


def _to_rgb(img: Image.Image, what: str, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_DEPTH_GRAY:
        return _high_depth_gray_to_rgb(img)
    if mode == "CMYK":
        notes.append(f"The {what} uses CMYK colours; it was converted to RGB, so colours may shift slightly.")
        return img.convert("RGB")
    if mode == "P":
        if "transparency" not in img.info:
            return img.convert("RGB")
        img = img.convert("RGBA")
    elif mode in ("PA", "RGBa", "LA", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return _flatten_on_white(img, what, notes)
    try:
        # 1-bit, L, YCbCr, HSV and friends have direct conversions.
        return img.convert("RGB")
    except (ValueError, OSError):
        raise ImageError(
            f"The {what} uses the {mode} colour mode, which is not supported: save it as an RGB JPEG or PNG."
        ) from None


def _flatten_on_white(img: Image.Image, what: str, notes: list[str]) -> Image.Image:
    alpha = img.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return img.convert("RGB")
    # White rather than black: a cut-out portrait on white looks like a studio photo to the detector,
    # while black would merge with dark hair.
    notes.append(f"The {what} has transparent areas; they were filled with white.")
    out = Image.new("RGB", img.size, _WHITE)
    out.paste(img.convert("RGB"), mask=alpha)
    return out


def _high_depth_gray_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale into 0..255 instead of clipping like PIL's convert."""
    # float32, scaled in place: a 50-megapixel 16-bit scan costs 200 MB here, not three float64 copies.
    arr = np.array(img, dtype=np.float32)
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        arr *= 255.0 / 65535.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr *= 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        # Older Pillow versions open 16-bit PNGs as mode "I" holding 0..65535.
        arr *= 255.0 / 65535.0
    elif hi > lo:
        # Anything else (negative values, 32-bit ranges) has no natural white point: stretch.
        arr -= lo
        arr *= 255.0 / (hi - lo)
    else:
        arr[...] = 0.0
    np.rint(arr, out=arr)
    np.clip(arr, 0, 255, out=arr)
    gray = arr.astype(np.uint8)
    del arr
    return Image.fromarray(gray).convert("RGB")


def _array_to_image(arr: np.ndarray, what: str) -> Image.Image:
    bad = ImageError(
        f"The {what} array has an unsupported shape {tuple(arr.shape)} or type {arr.dtype}: "
        "pass a uint8 array of shape (height, width, 3)."
    )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise bad
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 or arr.dtype == np.dtype(">u2"):
        # Full-range scaling: 65535 is white, as in a 16-bit PNG.
        arr = np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise bad
    # PIL infers L, RGB or RGBA from the shape of a uint8 array.
    return Image.fromarray(np.ascontiguousarray(arr))
