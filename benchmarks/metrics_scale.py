"""Time and memory of the pixel metrics on a VisA-size test set (2,162 maps of 256x256).

  python benchmarks/metrics_scale.py [--images 2162]

Random maps with random rectangular defects; prints seconds and the peak memory traced by
tracemalloc (numpy reports its allocations there) beyond the inputs themselves.
"""
import argparse
import time
import tracemalloc

import numpy as np

from ccl_jax import metrics


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=2162)
  parser.add_argument("--size", type=int, default=256)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  n, s = args.images, args.size
  maps = rng.random((n, s, s), dtype=np.float32)
  masks = np.zeros((n, s, s), np.uint8)
  for i in range(0, n, 2):  # half of the images get one defect
    y, x = rng.integers(0, s - 40, 2)
    masks[i, y:y + rng.integers(5, 40), x:x + rng.integers(5, 40)] = 1
    maps[i][masks[i] == 1] += 0.3
  print(f"{n} maps of {s}x{s} = {maps.size / 1e6:.0f} M pixels "
        f"({maps.nbytes / 2**30:.2f} GiB of float32 maps)")
  for name, fn in (("pixel_auroc", metrics.pixel_auroc), ("aupro", metrics.aupro)):
    tracemalloc.start()
    start = time.perf_counter()
    value = fn(masks, maps)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{name}: {value:.4f} in {seconds:.1f} s, peak extra memory {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
  main()
