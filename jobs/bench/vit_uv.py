"""ViT UV fine-tuning (SL2O §4.3's shape of result): Momentum†, Adam† and the learned optimizer on U, V and the head,
against full fine-tuning; and where a UV step's time goes.

What it measures, how long it takes and its figures: `raysub/bench/vit_uv.py` (``--help``).
"""
import sys

from raysub.bench.vit_uv import main

if __name__ == "__main__":
    sys.exit(main())
