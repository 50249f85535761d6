"""`make demo`: the whole pipeline on the embedded synthetic dataset."""

from __future__ import annotations

import argparse
import os
import sys

from avprep.errors import UserError
from avprep.synth import SynthConfig, write_synth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo")
    args = parser.parse_args()
    data = os.path.join(args.out, "data")
    try:
        if os.path.exists(os.path.join(data, "manifest.jsonl")):
            print(f"[demo] reusing synthetic dataset in {data}")
        else:
            summary = write_synth(data, SynthConfig(), progress=True)
            print(f"[demo] {summary.describe()}")
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
