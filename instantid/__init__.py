"""InstantID on current diffusers: identity-preserving SDXL generation from face photos.

Import the parts you need (`instantid.engine`, `instantid.models.pipeline`, ...); this package module stays
light so the UI and the command line start fast.
"""

import os

__version__ = "0.1.0"

# Before torch loads OpenMP (OpenMP reads this once, when it starts): OpenMP's threads otherwise spin while they
# wait, and two OpenMP programs on the same cores (the app beside a command-line run, two visitors' runs, other
# users of a small machine) spin against each other: a tiny-preset `python -m instantid generate` took 30.8-36.8 s
# instead of 8.4-8.5 s on a busy 2-core machine (BENCHMARKS.md, "CPU contention"). A user's own choice stands.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
