"""Why the demo runs at 96 px, not 64: XLA's CPU backend and 3x3 convs on tiny maps.

  python -m benchmarks.conv_small_maps

Times a 3x3, 512 -> 512 channel convolution (stride 1, padding 1, batch 16) on 2x2, 3x3 and
4x4 maps: the shapes of RD's neck at 64, 96 and 128 px with a ResNet-18 encoder. Prints the
median milliseconds per call and the ratio to the 3x3-map case.
"""
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app


def median_ms(fn, *args, repeats: int = 7) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  kernel = jnp.full((3, 3, 512, 512), 0.01, jnp.float32)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
  results = {size: median_ms(conv, jnp.ones((16, size, size, 512)), kernel)
             for size in (2, 3, 4)}
  print(f"device: {jax.devices()[0].device_kind}")
  for size, ms in results.items():
    print(f"{size}x{size} maps: {ms:8.2f} ms/call  ({ms / results[3]:5.1f}x the 3x3 case)")


if __name__ == "__main__":
  app.run(main)
