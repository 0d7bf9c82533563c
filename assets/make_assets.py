"""Regenerate the example photo shipped in assets/ (run from the repository root).

Source: `skimage.data.astronaut()`, NASA's portrait of astronaut Eileen Collins, public domain,
bundled in the scikit-image wheel. Only this script needs scikit-image; the app reads the JPEG.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

OUT = Path(__file__).resolve().parent / "astronaut.jpg"


def main() -> None:
    from skimage import data

    image = Image.fromarray(data.astronaut())  # 512 x 512 RGB
    # Head and shoulders, so the face fills a useful share of the frame.
    image = image.crop((64, 0, 448, 384))
    image.save(OUT, format="JPEG", quality=88, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
