"""Benchmark: the projection sharded by parameter rows (train.projection_sharding) against replicated.

What it measures, in worlds of real processes on gloo (CPU), each figure side by side in one run:
  step_sharded_over_replicated   P-SGD step time, sharded ÷ replicated, ResNet-20 (3×32×32), d = 40, global batch
                                 128, W = 2, interleaved timing rounds (goal ≤ 1.10)
  floats_per_step_internode_node_mode
                                 floats per step that cross groups in node mode (2 groups × 2 ranks): d + 1
  basis_bytes_read_per_rank      bytes a rank reads of a stored basis written in W blocks (goal N·d·4/W + headers)
  p_rss_sharded_over_replicated  peak RSS of a worker, sharded ÷ replicated, an MLP of ~20M parameters with a kept
                                 dense P at d = 64 (5.1 GB replicated per worker), W = 2 (goal ≤ 0.55); with the
                                 step-time ratio at that size (step_sharded_over_replicated_memory_size)

How long it takes: about 3 minutes on 2 cores, most of it drawing the two 20M × 64 dense P's; ~11 GB of RAM at
the peak (--skip-memory leaves the RSS comparison out).

How to run: python jobs/bench/sharded_projection.py [--memory-params-m 20] [--dim 64] [--skip-memory]
Output: progress lines with the load average, then as the last line one JSON object with the figures.
"""
import sys

from raysub.bench.sharded import main

if __name__ == "__main__":
    sys.exit(main())
