"""Style templates (data only). The names match the official InstantID Space's style list."""

from __future__ import annotations

from dataclasses import dataclass

NO_STYLE = "(No style)"


@dataclass(frozen=True)
class Style:
    positive: str  # holds "{prompt}"
    negative: str


STYLES: dict[str, Style] = {
    NO_STYLE: Style("{prompt}", ""),
    "Watercolor": Style(
        "watercolor painting, {prompt}. soft washes of colour, visible paper grain, loose brushwork, artistic",
        "photograph, photorealistic, 3d render, hard edges, oversaturated",
    ),
    "Film Noir": Style(
        "film noir still, {prompt}. black and white, high contrast, deep shadows, venetian-blind light, 1940s",
        "colour, bright daylight, cheerful, cartoon, anime",
    ),
    "Neon": Style(
        "neon-lit night portrait, {prompt}. glowing magenta and cyan signs, wet street reflections, cinematic",
        "daylight, washed out, dull colours, flat lighting",
    ),
    "Jungle": Style(
        "waist-up portrait in a dense tropical jungle, {prompt}. lush leaves, humid haze, dappled sunlight",
        "city, buildings, snow, desert, indoor",
    ),
    "Mars": Style(
        "portrait on the surface of Mars, {prompt}. red dust, rocky plains, thin hazy sky, science fiction",
        "green grass, trees, ocean, city street",
    ),
    "Vibrant Color": Style(
        "vibrant colourful portrait, {prompt}. bold saturated palette, energetic, crisp detail",
        "monochrome, black and white, dull, muted colours",
    ),
    "Snow": Style(
        "winter portrait in falling snow, {prompt}. cold light, frost, breath in the air, cosy clothing",
        "summer, beach, heat, sunburn, tropical",
    ),
    "Line art": Style(
        "line art drawing, {prompt}. clean ink outlines, minimal shading, white background, graphic",
        "photograph, photorealistic, painting, colour fill, gradients",
    ),
}

STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def apply_style(style_name: str, prompt: str, negative_prompt: str) -> tuple[str, str]:
    """Return (prompt, negative prompt) with the style's template applied; the caller validated the name."""
    style = STYLES[style_name]
    positive = style.positive.replace("{prompt}", prompt)
    negatives = [n for n in (style.negative, negative_prompt) if n]
    return positive, ", ".join(negatives)
