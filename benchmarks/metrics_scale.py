"""Time and memory of the pixel metrics on a VisA-size test set (2,162 maps of 256x256).

  python -m benchmarks.metrics_scale [--images 2162] [--size 256]

Random maps with random rectangular defects; prints seconds and the peak memory traced by
tracemalloc (numpy reports its allocations there) beyond the inputs themselves.
"""
import time
import tracemalloc

import numpy as np
from absl import app, flags

from ccl_jax.results import metrics


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags; defined when it runs, never on import."""
  flags.DEFINE_integer("images", 2162, "Number of anomaly maps.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("size", 256, "Side of each map in pixels.", lower_bound=41,
                       flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  rng = np.random.default_rng(0)
  n, s = flags.FLAGS.images, flags.FLAGS.size
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
  define_flags()
  app.run(main)
