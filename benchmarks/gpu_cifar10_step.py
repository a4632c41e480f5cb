"""One-GPU measurement of the full CIFAR-10 WRN-16-4 recipe step (batch 4096, augmult 16).

Prepared for a lent GPU machine; finishes in well under 5 minutes on one recent GPU. Prints one
JSON line per configuration (the fast engine, then the torch.func engine at a smaller batch for
comparison) with the median step time, peak GPU memory and the projected full-run hours.

    python benchmarks/gpu_cifar10_step.py [--device cuda:0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_step import measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run benchmarks/cifar10_step.py on the CPU instead")
    for batch, physical, engine, repeats in ((4096, 64, "auto", 3), (512, 32, "vmap", 2)):
        print(json.dumps(measure(args.device, batch, 16, physical, repeats, engine)), flush=True)


if __name__ == "__main__":
    main()
