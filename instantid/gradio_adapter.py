"""The one place that reaches past Gradio's public API: how an endpoint's inputs are refused.

Why it exists: Gradio offers no public hook between an API payload and a component's own conversion.
Its refusals do not name the parameter ("Value 1000 is greater than maximum value 100." - which of 19?),
a value of the wrong type becomes an anonymous server error, it would read "false" as true and round
3.7 to 4, and a `gr.Image` opens every upload with PIL before our code sees it (so a file that is not an
image, or a bomb, would also end as an anonymous error instead of `instantid.images`' sentence).

`guard_input` wraps one component instance's `preprocess` (a public method, replaced on the instance: a
subclass would make Gradio write a `.pyi` stub beside this file). Everything else in the app uses public
Gradio only: cancellation reaches `api.generate` because Gradio closes a generator whose client left.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from .errors import InvalidParameter
from .requests import Param, format_bound


def input_error(component: Any, name: str, value: Any, exc: Exception) -> str:
    """One sentence naming the parameter, the value and what the component accepts."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
    if lo is not None and hi is not None:
        step = getattr(component, "step", None)
        if getattr(component, "precision", None) == 0 or step == 1:
            kind = "an integer"
        elif isinstance(step, int) and step > 1:
            kind = f"a multiple of {step}"
        else:
            kind = "a number"
        return f"Invalid {name}={shown}: must be {kind} in {format_bound(lo)}..{format_bound(hi)}."
    choices = getattr(component, "choices", None)
    if choices:
        names = [str(c[1]) if isinstance(c, tuple) else str(c) for c in choices]
        return f"Invalid {name}={shown}: choose from {', '.join(names)}."
    reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"Invalid {name}={shown}: {reason}"


def guard_input(component: Any, param: Param) -> None:
    """Check `param`'s value as sent (its declared kind and range) before the component converts it;
    hand photo uploads over undecoded. Gradio has already checked that an upload lies in its own cache."""
    original = component.preprocess
    hand_over = isinstance(component, gr.Image) and component.type == "filepath" and component.image_mode is None
    name = param.name

    def preprocess(payload: Any) -> Any:
        if param.kind not in ("image", "images") and not (payload is None and param.kind != "boolean"):
            try:
                param.check(payload)
            except InvalidParameter as exc:
                # The page's own range (a server may allow less than the declaration) when it has one.
                ranged = isinstance(payload, (int, float)) and not isinstance(payload, bool)
                message = input_error(component, name, payload, exc) if ranged else str(exc)
                raise gr.Error(message, print_exception=False) from None
        if hand_over and payload is not None:
            # An object with only a URL: Gradio fetched nothing, and its own message would print the object. A
            # `data:` URL Gradio would decode itself, before any byte or pixel limit (a 31 MB one was), and
            # re-encode lossily (a swap's target came back with every pixel changed): refused the same way.
            if not payload.path or (payload.url or "").lstrip().lower().startswith("data:"):
                raise gr.Error(
                    f"Invalid {name}: send the photo itself as an upload (gradio_client: handle_file(path)); a "
                    "URL, a data: URL or a path on the server is never read.",
                    print_exception=False,
                )
            return str(payload.path)
        try:
            return original(payload)
        except Exception as exc:  # every refusal of a value gets the same kind of sentence
            raise gr.Error(input_error(component, name, payload, exc), print_exception=False) from None

    component.preprocess = preprocess
