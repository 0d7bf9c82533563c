"""`python -m bench NAME`: the same benchmarks as `python -m instantid bench`, with the extra knobs.

python -m bench load-memory --size micro --cache /tmp/hub   # sizes: full (default), quick, micro
python -m bench load-memory --all-parts                      # + Engine.load_all with every optional part
python -m bench load-memory --cpu-profile                    # + the cpu profile's loads (bf16; float32 when small)
python -m bench overhead --requests 40
python -m bench overhead --face-models full                  # antelopev2-sized face models (random weights)
python -m bench gpu --dry-run                                # the CPU-sized form of the GPU script
python -m bench preview                                      # the live preview's cost against the denoising
python -m bench framing                                      # framing and head angle, measured from the drawing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import BENCHMARKS, SIZES, run_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("--quick", action="store_true", help="reduced sizes / fewer requests")
    p.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    p.add_argument("--size", choices=SIZES, help="load-memory: checkpoint width")
    p.add_argument("--cache", type=Path, help="load-memory: the local Hugging Face cache to write and read")
    p.add_argument("--all-parts", action="store_true", help="load-memory: also the start-up with every part")
    p.add_argument("--cpu-profile", action="store_true", help="load-memory: also the cpu profile's loads")
    p.add_argument("--requests", type=int, help="overhead: how many timed requests")
    p.add_argument("--rounds", type=int, help="overhead: variants take turns this many times (default 3 with full)")
    p.add_argument("--face-models", choices=("standin", "full"), help="overhead: the wheel's or antelopev2-sized")
    p.add_argument("--dry-run", action="store_true", help="gpu: CPU-sized run that proves the script")
    args = p.parse_args(argv)
    options = {
        "size": args.size,
        "cache": args.cache,
        "all_parts": args.all_parts or None,
        "cpu_profile": args.cpu_profile or None,
        "requests": args.requests,
        "face_models": args.face_models,
        "rounds": args.rounds,
        "dry_run": args.dry_run or None,
    }
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_benchmark(args.name, quick=args.quick, record=args.record, command=command, **options)


if __name__ == "__main__":
    sys.exit(main())
