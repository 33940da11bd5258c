"""HierCore memory bank size and build time on synthetic images.

  python -m benchmarks.memory_bank [--encoders efficientnet_lite0 resnet18]
      [--num_images 200 1000] [--image_size 96] [--num_groups 4] [--coreset_fraction 0.1]
      [--json memory_bank.json]

Random-weight encoders (`weights.encoder_variables(..., 'none')`) and uniformly random uint8
images, image i in group i % num_groups: the timings measure the pipeline (patch features,
streaming greedy coreset), not a trained model; random images are the hard case for the
coreset (no redundancy to exploit), which does not change its cost. Build time is one cold
run (it includes jit compilation, a few seconds on CPU). Prints a markdown table and writes
the rows plus the machine (platform, CPU count, JAX backend and devices) as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from ccl_jax import hiercore, inference, models, weights


class RandomImages:
  """Deterministic random uint8 images in the record format of `input_pipeline`."""

  def __init__(self, num_images: int, image_size: int, num_groups: int):
    self.num_images, self.image_size, self.num_groups = num_images, image_size, num_groups

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, i: int) -> dict:
    rng = np.random.default_rng(i)
    size = self.image_size
    return {"image": rng.integers(0, 256, (size, size, 3), np.uint8),
            "mask": np.zeros((size, size), np.uint8), "label": 0,
            "class_id": i % self.num_groups}


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
          "jax_backend": jax.default_backend(),
          "devices": [str(d.device_kind) for d in jax.devices()]}


def run(encoder_name: str, num_images: int, args: argparse.Namespace) -> dict:
  encoder = models.build_encoder(encoder_name)
  variables = weights.encoder_variables(encoder, "none", seed=0, image_size=args.image_size)
  patch_fn = hiercore.make_patch_fn(encoder, variables, feature_dim=args.feature_dim)
  source = RandomImages(num_images, args.image_size, args.num_groups)
  group_ids = np.arange(num_images) % args.num_groups
  sharding = inference.batch_sharding()
  start = time.perf_counter()
  bank = hiercore.build_memory_bank(
      patch_fn, source, np.arange(num_images), group_ids, args.num_groups,
      coreset_fraction=args.coreset_fraction, chunk_images=args.chunk_images,
      global_batch_size=args.batch_size, batch_sharding=sharding,
      projection_dim=args.projection_dim)
  jax.block_until_ready(bank.features)
  seconds = time.perf_counter() - start
  patch_shape = jax.eval_shape(patch_fn, jax.ShapeDtypeStruct(
      (1, args.image_size, args.image_size, 3), np.uint8)).shape
  return {"encoder": encoder_name, "num_images": num_images,
          "patches_per_image": int(patch_shape[1] * patch_shape[2]),
          "channels": bank.feature_dim,
          "training_patches": int(num_images * patch_shape[1] * patch_shape[2]),
          "coreset_per_group": np.asarray(bank.counts).tolist(),
          "bank_mib": bank.nbytes / 2**20, "build_s": seconds,
          "images_per_s": num_images / seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "resnet18"])
  parser.add_argument("--num_images", nargs="+", type=int, default=[200, 1000])
  parser.add_argument("--image_size", type=int, default=96)
  parser.add_argument("--num_groups", type=int, default=4)
  parser.add_argument("--coreset_fraction", type=float, default=0.1)
  parser.add_argument("--chunk_images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--projection_dim", type=int, default=hiercore.DEFAULT_PROJECTION_DIM)
  parser.add_argument("--feature_dim", type=int, default=None)
  parser.add_argument("--json", default="memory_bank.json")
  args = parser.parse_args()
  rows = [run(name, n, args) for name in args.encoders for n in args.num_images]
  info = machine()
  print(f"\nMachine: {info['platform']}, {info['cpu_count']} CPUs, JAX {info['jax_version']} "
        f"on {info['jax_backend']} ({', '.join(info['devices'])})")
  print(f"{args.image_size} px, {args.num_groups} groups, coreset_fraction "
        f"{args.coreset_fraction}, chunk_images {args.chunk_images}, batch {args.batch_size}, "
        f"projection_dim {args.projection_dim}, feature_dim {args.feature_dim}\n")
  print("| encoder | images | patches/image x channels | coreset per group | bank MiB "
        "| build s (cold) | images/s |")
  print("|---|---:|---:|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['encoder']} | {r['num_images']} | {r['patches_per_image']} x {r['channels']} "
          f"| {', '.join(map(str, r['coreset_per_group']))} | {r['bank_mib']:.2f} "
          f"| {r['build_s']:.1f} | {r['images_per_s']:.1f} |")
  with open(args.json, "w") as f:
    json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=2)
  print(f"\nWrote {args.json}")


if __name__ == "__main__":
  main()
