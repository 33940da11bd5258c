"""HierCore memory bank size and build time on synthetic images.

  python -m benchmarks.memory_bank [--encoders efficientnet_lite0,resnet18]
      [--num_images 200,1000] [--image_size 96] [--num_groups 4] [--coreset_fraction 0.1]
      [--json memory_bank.json]

Random-weight encoders (`encoder_weights.encoder_variables(..., 'none')`) and uniformly random uint8
images, image i in group i % num_groups: the timings measure the pipeline (patch features,
streaming greedy coreset), not a trained model; random images are the hard case for the
coreset (no redundancy to exploit), which does not change its cost. Build time is one cold
run (it includes jit compilation, a few seconds on CPU). Prints a markdown table and writes
the rows plus the machine (platform, CPU count, JAX backend and devices) as JSON.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags

from ccl_jax import hiercore, models
from ccl_jax.runtime import inference
from ccl_jax.weights import encoder_weights


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


def run(encoder_name: str, num_images: int, args: flags.FlagValues) -> dict:
  encoder = models.build_encoder(encoder_name)
  variables = encoder_weights.encoder_variables(encoder, "none", seed=0, image_size=args.image_size)
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


class _PositiveIntListParser(flags.ListParser):
  """Comma-separated positive integers."""

  def parse(self, argument):
    values = [int(v) for v in super().parse(argument)]
    if any(v < 1 for v in values):
      raise ValueError(f"expected positive integers, got {values}")
    return values


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags; defined when it runs, never on import."""
  fv = flag_values
  flags.DEFINE_list("encoders", ["efficientnet_lite0", "resnet18"], "Encoders to measure.",
                    flag_values=fv)
  flags.DEFINE(_PositiveIntListParser(), "num_images", [200, 1000],
               "Training-set sizes to measure (comma-separated).",
               serializer=flags.CsvListSerializer(","), flag_values=fv)
  flags.DEFINE_integer("image_size", 96, "Image side in pixels.", flag_values=fv)
  flags.DEFINE_integer("num_groups", 4, "Groups (memory banks); image i is in group "
                       "i % num_groups.", flag_values=fv)
  flags.DEFINE_float("coreset_fraction", 0.1, "Share of each group's patches kept.",
                     flag_values=fv)
  flags.DEFINE_integer("chunk_images", 64, "Images per merge-and-reduce step of the coreset.",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Images per feature-extraction call.", flag_values=fv)
  flags.DEFINE_integer("projection_dim", hiercore.DEFAULT_PROJECTION_DIM, "Random projection "
                       "dimension of the greedy coreset selection.", flag_values=fv)
  flags.DEFINE_integer("feature_dim", None, "Patch feature channels after reduction (None: "
                       "no reduction).", flag_values=fv)
  flags.DEFINE_string("json", "memory_bank.json", "Output JSON file.", flag_values=fv)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
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
    options = {f.name: f.value for f in args.get_flags_for_module(sys.modules[__name__])}
    json.dump({"machine": info, "args": options, "rows": rows}, f, indent=2)
  print(f"\nWrote {args.json}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
