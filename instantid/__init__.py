"""InstantID on current diffusers: identity-preserving SDXL generation from face photos.

Import the parts you need (`instantid.engine`, `instantid.pipeline`, ...); this package module stays
light so the UI and the command line start fast.
"""

__version__ = "0.1.0"
