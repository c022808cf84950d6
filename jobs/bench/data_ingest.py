"""Benchmark: images per second into 2 Ray Train workers, Ray Data against the torch DataLoader (issue 26 §1).

What it measures, side by side in one fit (epochs of the sides interleaved), on the same generated JPEGs (about ImageNet's mean size), 64² and 224²
random-resized crops with flips, 2 Train workers on one node, no model (the data path alone):
  dataloader_local   today's path: a torch DataLoader per worker (--loader-workers processes) from local disk
  ray_data_local     Ray Data's streaming executor decodes and augments, from local disk
  ray_data_s3        the same from an S3-protocol server on loopback (moto, in this process)
Figures: images/s and the cores busy for each side and size, and, for the worse of the two sizes and per size:
  ray_data_over_dataloader      ray_data_local ÷ dataloader_local: the data path alone (goal ≥ 0.9 on one node)
  s3_over_local                 ray_data_s3 ÷ ray_data_local: the storage alone
  ray_data_s3_over_dataloader   ray_data_s3 ÷ dataloader_local: both (the product of the two)
  s3_server_gets_per_s          what the loopback server serves to 8 threads alone, the ceiling of ray_data_s3
                                (moto is a Python server sharing the machine's cores: s3_over_local measures it as
                                much as raysub), and ray_data_s3_over_server_gets

How long it takes: about 5 minutes on 2 cores at the default 2,048 images (one Train fit, the sides interleaved).
How to run: python jobs/bench/data_ingest.py [--images 2048] [--sizes 64 224] [--rounds 3] [--sides ...]
Output: a line per side and size with the load average, then as the last line one JSON object with the figures.
"""
import sys

from raysub.bench.data_ingest import main

if __name__ == "__main__":
    sys.exit(main())
