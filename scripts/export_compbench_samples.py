"""Lay out a finished ``eclipse-prior benchmark-images`` run's images as T2I-CompBench's reference scripts read them,
so the reference code (UniDet, BLIP at 480 px, OpenAI CLIP) can score the very same images:

    PYTHONPATH=src python scripts/export_compbench_samples.py OUT DEST

writes ``DEST/<prior>/<category>/samples/<prompt>_<NNNNNN>.png``; point the reference's ``--out_dir``/``--outpath``
at ``DEST/<prior>/<category>`` (see docs/compbench-fidelity.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eclipse_prior.errors import EclipsePriorError
from eclipse_prior.evaluation.image_benchmark import export_reference_samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the benchmark-images --out folder")
    ap.add_argument("dest", type=Path, help="where to write <prior>/<category>/samples/")
    args = ap.parse_args()
    try:
        counts = export_reference_samples(args.out, args.dest)
    except (EclipsePriorError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"copied {counts['copied']} images to {args.dest} ({counts['skipped']} skipped: prompt not a file name)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
