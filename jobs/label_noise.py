"""Label-noise robustness, the DLDR Table 4 protocol: SGD final / SGD best vs P-SGD at several d, per noise level.

For every noise level c a fixed random fraction c of the training labels is replaced by uniformly random labels
(fixed by the seed: every method sees the same corrupted labels). At each level: one full-SGD run whose
trajectory is sampled, the basis at max(d), then P-SGD from θ0 at each d. "SGD best" is the best test accuracy
seen during SGD (a reference only: it selects on the test set). Writes OUT/label_noise.json, OUT/label_noise.md
(the table) and OUT/label_noise.png (test accuracy vs c per method); each level's run directory is OUT/c0.8 etc.
Re-running continues finished levels and stages (they are skipped).

Time: Fashion-MNIST LeNet-5 on 2 CPU cores, one level ≈ 5 min of SGD + 1–2 min per P-SGD dimension.

Local:

    python jobs/label_noise.py                                         # fashion_mnist_lenet, c = 0, .7, .8, .9
    python jobs/label_noise.py --levels 0.8 --dims 10,20,30,40 --out runs/label_noise
    python jobs/label_noise.py quickstart --levels 0.0,0.8 --dims 5,10   # digits, a minute per level

On a cluster (RAY_AUTH_MODE=token for token-auth clusters; see cluster/local.md):

    ray job submit --working-dir . -- python jobs/label_noise.py fashion_mnist_lenet --out /shared/label_noise

Last line of output: one JSON object with the table.
"""
from __future__ import annotations

import sys

from raysub.bench.label_noise import main  # the levels' runs, the table, the JSON and the plot

if __name__ == "__main__":
    sys.exit(main())
