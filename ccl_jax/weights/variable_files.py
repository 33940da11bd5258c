"""Flax msgpack variable files: the one reader and writer of variable trees on disk.

A variable file is `flax.serialization.msgpack_serialize` of a module's variable tree
(`{'params': ..., 'batch_stats': ...}`). The encoder weights `model.encoder_weights` names
(written by data_prep/convert_weights.py) and the model variables ccl_jax.evaluate scores
are such files.

`load` checks the whole tree against the architecture's template before anything is used,
so a wrong or partial file is an error that lists what is missing, unexpected or
mis-shaped; a file never loads partially. `save` replaces its target atomically, so a
reader never sees a half-written file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax.runtime.files import atomic_write

__all__ = ["EXPECTED_FORM", "check_tree", "load", "save"]

# Quoted by every error of `load`, so the user learns what the file should have been.
EXPECTED_FORM = ("a Flax msgpack variable file (flax.serialization.msgpack_serialize of the "
                 "module's {'params': ..., 'batch_stats': ...} tree, as "
                 "data_prep/convert_weights.py writes)")

_MAX_LISTED = 20


def _flatten(tree: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(tree)).items()}


def check_tree(loaded: Any, template: Any, source: str) -> None:
  """Checks a loaded variable tree against the architecture's template.

  Args:
    loaded: the variable tree read from a file or converted from a checkpoint.
    template: the tree the module builds (e.g. `jax.eval_shape` of its `init`); only the
      leaves' `shape` is used.
    source: what `loaded` came from, the start of the error message.

  Raises:
    ValueError: `loaded` is not a nested mapping, or it has missing, unexpected or
      mis-shaped entries; the message lists every one (the first 20 of each kind).
  """
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{source} is not a variable tree (a nested mapping of arrays) but a "
                     f"{type(loaded).__name__}.")
  got, want = _flatten(loaded), _flatten(template)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mis_shaped = [f"{k}: file {tuple(np.shape(got[k]))}, model {tuple(want[k].shape)}"
                for k in sorted(set(got) & set(want))
                if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if missing or unexpected or mis_shaped:
    lines = [f"{source} does not match the architecture:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", mis_shaped)):
      if items:
        more = " ..." if len(items) > _MAX_LISTED else ""
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more)
    raise ValueError("\n".join(lines))


def load(path: str, template: Any, what: str, *, hint: str = "") -> Any:
  """Reads a variable file and checks it against the architecture (never partially).

  Args:
    path: the file (`~` is expanded).
    template: the tree the module builds, as for `check_tree`.
    what: the setting or flag that named the file (e.g. 'model.encoder_weights' or
      '--variables'); every error message starts with it.
    hint: appended to the message when there is no file (e.g. the alternatives the
      setting accepts).

  Returns:
    The variable tree with float32 `jax.Array` leaves.

  Raises:
    FileNotFoundError: there is no file at `path`.
    ValueError: the file is not readable msgpack, or its tree does not match `template`.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no file at {path!r}; expected {EXPECTED_FORM}{hint}.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    loaded = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ValueError(f"{what}: {path!r} is not readable as {EXPECTED_FORM} "
                     f"({type(e).__name__}: {e}).") from e
  check_tree(loaded, template, f"{what} file {path!r}")
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), loaded)


def save(path: str, tree: Any) -> None:
  """Writes a variable tree as a Flax msgpack file, atomically.

  Through `files.atomic_write`: a crash or error never leaves a partial file behind.
  """
  data = flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(tree)))
  atomic_write(path, data)
