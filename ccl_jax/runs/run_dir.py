"""A run directory and every file in it: the one module that reads and writes them.

  config.json             the run's settings (`settings.RunSettings.to_dict`)
  checkpoints/latest/<n>  train state + loop bookkeeping, for resuming after preemption
  checkpoints/best/<n>    the state with the lowest validation loss
  memory_bank.npz         HierCore's per-group coresets
  decision.json           groups and class-wise thresholds (`grouping`, `thresholds`)
  metrics.json            per-class and mean metrics, decisions, training history
  results.md              the same as markdown tables
  heatmaps/<class>/*.png  image | ground-truth contour | anomaly map
  report.html             one self-contained page of all the above (`ccl_jax.results.report`)
  events/                 TensorBoard event files (`ccl_jax.results.events`)
  .lock                   held while a program writes the run

Every file but the event files is written through `atomic_write` (a temporary file in the
same folder, fsync, rename), so a kill at any moment leaves either the old or the new file,
never half of one.
Checkpoints are Orbax's, which commit a step by renaming its finished folder. Reading never
creates anything, and a missing or malformed file is an error that names it and says what
writes it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from ccl_jax.config import settings as settings_lib
from ccl_jax.runtime.files import StorageError, atomic_write, disk_space, storage_error
from ccl_jax.decisions.grouping import Groups
from ccl_jax.hiercore.memory_bank import MemoryBank
from ccl_jax.decisions.thresholds import Thresholds

CONFIG_FILE = "config.json"
DECISION_FILE = "decision.json"
DECISION_FORMAT_VERSION = 1
MEMORY_BANK_FILE = "memory_bank.npz"
MEMORY_BANK_FORMAT_VERSION = 1
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
REPORT_FILE = "report.html"
HEATMAPS_DIR = "heatmaps"
EVENTS_DIR = "events"
CHECKPOINTS = ("latest", "best")
# Orbax's metadata files and the JSON meta beside the arrays of a checkpoint.
_CHECKPOINT_OVERHEAD_BYTES = 1 << 20
_DECISION_KEYS = ("format_version", "groups", "thresholds", "meta")


class RunDirError(RuntimeError):
  """A run directory that cannot be used as asked (locked, or holding another run)."""


def _json_default(x: Any):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"Not JSON serialisable: {type(x)}")


def to_json(value: Any, **kwargs) -> str:
  return json.dumps(value, indent=2, default=_json_default, **kwargs)


class RunDir:
  """The files of one run directory (see the module docstring)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def exists(self, name: str) -> bool:
    return os.path.exists(self.file(name))

  def _require(self, name: str, explanation: str) -> str:
    path = self.file(name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: {explanation}.")
    return path

  def _read_json(self, name: str, explanation: str) -> tuple[str, Any]:
    """(path, parsed JSON) of the run's file `name`; a missing file is explained."""
    path = self._require(name, explanation)
    try:
      with open(path, encoding="utf-8") as f:
        return path, json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise ValueError(f"{path}: not valid JSON ({err})") from None

  # -- locking -------------------------------------------------------------------------------

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Held while one program writes this run; a second one refuses at once."""
    os.makedirs(self.path, exist_ok=True)
    handle = open(self.file(".lock"), "a+")  # pylint: disable=consider-using-with
    try:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise RunDirError(
            f"{self.path} is in use by {holder}: two programs cannot write one run "
            "directory. Wait for it to finish, or give this command another --workdir."
        ) from None
      handle.seek(0)
      handle.truncate()
      handle.write(f"process {os.getpid()}\n")
      handle.flush()
      yield
    finally:
      handle.close()  # closing releases the lock

  # -- settings --------------------------------------------------------------------------------

  def write_settings(self, run_settings: settings_lib.RunSettings) -> None:
    atomic_write(self.file(CONFIG_FILE), to_json(run_settings.to_dict()))

  def read_settings(self) -> settings_lib.RunSettings:
    path, values = self._read_json(
        CONFIG_FILE, f"{self.path!r} is not a ccl_jax workdir (every training or HierCore run "
        "writes its config.json at its start)")
    return settings_lib.from_dict(values, source=path)

  def check_same_run(self, requested: settings_lib.RunSettings) -> None:
    """Refuses to continue a run directory that holds a run of other settings."""
    if not self.exists(CONFIG_FILE):
      return
    changed = settings_lib.changed_keys(self.read_settings(), requested)
    if changed:
      raise RunDirError(
          f"{self.path} holds a run with other settings, so it cannot be resumed with this "
          "command:\n  " + "\n  ".join(changed) + "\nTo train these settings, give another "
          "--workdir (or delete this one). To evaluate the stored run, use `python -m "
          f"ccl_jax.evaluate --workdir {self.path}`.")

  # -- checkpoints -----------------------------------------------------------------------------

  def checkpoint_dir(self, which: str) -> str:
    if which not in CHECKPOINTS:
      raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {which!r}.")
    return os.path.join(self.path, "checkpoints", which)

  def checkpoint_step(self, which: str) -> int | None:
    """The step of the `which` checkpoint, None if there is none (creates nothing)."""
    directory = self.checkpoint_dir(which)
    if not os.path.isdir(directory):
      return None
    return _manager(directory, create=False).latest_step()

  def save_checkpoint(self, which: str, state: Any, meta: dict) -> None:
    """Saves `state` (a pytree) and `meta` (JSON) as the `which` checkpoint, replacing the
    previous one. A step folder left by a run killed after writing it is replaced."""
    directory = self.checkpoint_dir(which)
    step = int(jax.device_get(state.step))
    # A save that runs out of space fails in hundreds of Orbax writes at once, each with its
    # own traceback; the common case, a disk already too full, is said before it starts.
    needed = _CHECKPOINT_OVERHEAD_BYTES + sum(
        leaf.nbytes for leaf in jax.tree_util.tree_leaves(state) if hasattr(leaf, "nbytes"))
    space = disk_space(self.path)
    if space is not None and space[0] < needed:
      raise StorageError(errno.ENOSPC, directory, needed_bytes=needed)
    try:
      manager = _manager(directory, create=True)
      if step in manager.all_steps():
        manager.delete(step)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      manager.wait_until_finished()
      manager.close()
    except Exception as error:
      failure = storage_error(error, directory)
      if failure is None:
        raise
      # The earlier steps are untouched: Orbax removes them only after a save commits.
      _remove_unfinished_saves(directory)
      raise failure from error

  def newest_checkpoint(self) -> str:
    """Which checkpoint a rerun resumes from, in words."""
    try:
      step = self.checkpoint_step("latest")
    except Exception:  # pylint: disable=broad-except
      step = None  # unreadable is as good as none for a rerun
    if step is None:
      return "no checkpoint has been saved yet"
    return f"the newest checkpoint is step {step} in {self.checkpoint_dir('latest')}"

  def discard_checkpoints_after(self, which: str, step: int) -> None:
    """Removes `which` checkpoints newer than `step`: a kill between saving `best` and
    `latest` leaves a best step that the resumed run will reach and save again."""
    directory = self.checkpoint_dir(which)
    if not os.path.isdir(directory):
      return
    manager = _manager(directory, create=True)
    for stale in [s for s in manager.all_steps() if s > step]:
      manager.delete(stale)
    manager.close()

  def restore_checkpoint(self, which: str, target: Any) -> tuple[Any, dict]:
    """(state, meta) of the `which` checkpoint, restored into `target`'s structure and
    shardings; a stored parameter of another shape is an error naming it."""
    step = self.checkpoint_step(which)
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.checkpoint_dir(which)}; a training run "
                              "writes 'latest' and 'best' there.")
    _check_shapes(self.checkpoint_dir(which), step, target)
    manager = _manager(self.checkpoint_dir(which), create=False)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    manager.close()
    return restored["state"], restored["meta"]

  def restore_model_variables(self, which: str, template: Any, sharding) -> tuple[Any, int]:
    """({'params', 'batch_stats'} of the `which` checkpoint, its step), checked against the
    model's `template` (shapes), without the optimizer state's structure."""
    step = self.checkpoint_step(which)
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.checkpoint_dir(which)}; expected "
                              "'best' or 'latest' of a training run.")
    manager = _manager(self.checkpoint_dir(which), create=False, by_path=True)
    metadata = manager.item_metadata(step)["state"]
    wanted = {"params": metadata["params"], "batch_stats": metadata["batch_stats"]}
    _compare_shapes(wanted, template, self.checkpoint_dir(which))
    abstract = jax.tree_util.tree_map(
        lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding), template)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abstract["params"], "batch_stats": abstract["batch_stats"]},
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)))
    manager.close()
    return restored["state"], step

  # -- decisions -------------------------------------------------------------------------------

  def write_decision(self, groups: Groups, thresholds: Thresholds, meta: dict) -> str:
    """decision.json: the routing groups, their thresholds and a JSON meta dict."""
    if not isinstance(groups, Groups) or not isinstance(thresholds, Thresholds):
      raise ValueError("groups must be a grouping.Groups and thresholds a Thresholds")
    if thresholds.per_group.size != groups.num_groups:
      raise ValueError(
          f"thresholds has {thresholds.per_group.size} per-group values but groups has "
          f"{groups.num_groups} groups; they must match")
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
      raise ValueError(f"meta must be a dict with string keys; got {meta!r}")
    document = {"format_version": DECISION_FORMAT_VERSION, "groups": groups.to_json(),
                "thresholds": thresholds.to_json(), "meta": meta}
    try:
      text = json.dumps(document, allow_nan=False, indent=1)
    except (TypeError, ValueError) as err:
      raise ValueError(f"meta is not JSON-serialisable without NaN/Inf: {err}") from None
    return atomic_write(self.file(DECISION_FILE), text)

  def read_decision(self) -> tuple[Groups, Thresholds, dict]:
    """(groups, thresholds, meta) of decision.json; every error names the file and key."""
    path, document = self._read_json(
        DECISION_FILE, "it holds the groups and thresholds that turn scores into decisions "
        "and is written at the end of training (python -m ccl_jax.main) and of HierCore "
        "fitting; finish (or rerun) that run with this workdir to create it")
    if not isinstance(document, dict):
      raise ValueError(f"{path}: top level must be a JSON object; got {type(document).__name__}")
    for key in _DECISION_KEYS:
      if key not in document:
        raise ValueError(f"{path}: missing key {key!r} (expected keys {', '.join(_DECISION_KEYS)})")
    if document["format_version"] != DECISION_FORMAT_VERSION:
      raise ValueError(
          f"{path}: key 'format_version' is {document['format_version']!r}; this code reads "
          f"version {DECISION_FORMAT_VERSION}")
    try:
      groups = Groups.from_json(document["groups"])
    except ValueError as err:
      raise ValueError(f"{path}: key 'groups': {err}") from None
    try:
      thresholds = Thresholds.from_json(document["thresholds"])
    except ValueError as err:
      raise ValueError(f"{path}: key 'thresholds': {err}") from None
    if not isinstance(document["meta"], dict):
      raise ValueError(f"{path}: key 'meta' must be a JSON object; got {document['meta']!r}")
    if thresholds.per_group.size != groups.num_groups:
      raise ValueError(
          f"{path}: key 'thresholds.per_group' has {thresholds.per_group.size} values but "
          f"'groups.names' has {groups.num_groups}; they must match")
    return groups, thresholds, document["meta"]

  # -- memory bank -----------------------------------------------------------------------------

  def write_memory_bank(self, bank: MemoryBank) -> str:
    def write(f):
      np.savez(f, features=np.asarray(bank.features, np.float32),
               counts=np.asarray(bank.counts, np.int32),
               format_version=np.int32(MEMORY_BANK_FORMAT_VERSION))
    return atomic_write(self.file(MEMORY_BANK_FILE), write)

  def read_memory_bank(self) -> MemoryBank:
    """The HierCore memory bank; a missing, unreadable or inconsistent file is an error
    naming it and what is wrong."""
    return read_memory_bank_file(self._require(
        MEMORY_BANK_FILE, "a HierCore run (model.kind=hiercore) writes it after building its "
        "memory bank"))

  # -- results ---------------------------------------------------------------------------------

  def write_results(self, result: dict[str, Any], table: str,
                    heatmaps: list[tuple[str, str, np.ndarray]]) -> None:
    """metrics.json, results.md and heatmaps/<class>/<stem>.png ([H, W, 3] uint8 figures)."""
    atomic_write(self.file(METRICS_FILE), to_json(result))
    atomic_write(self.file(RESULTS_FILE), table + "\n")
    for class_name, stem, figure in heatmaps:
      atomic_write(os.path.join(self.path, HEATMAPS_DIR, class_name, f"{stem}.png"),
                   lambda f, figure=figure: Image.fromarray(figure).save(f, format="PNG"))

  def write_report(self, html: str) -> str:
    return atomic_write(self.file(REPORT_FILE), html)

  def read_metrics(self) -> dict[str, Any]:
    """metrics.json as written by `write_results` (undefined values are null)."""
    return self._read_json(METRICS_FILE, "every finished run and evaluation writes it")[1]

  def event_writer(self, purge_step: int | None = None):
    """A TensorBoard writer appending a new event file to events/.

    Event files are the one non-atomic file of a run: TensorBoard's format is an append-only
    log that the viewer reads while the run goes, so it cannot be replaced whole. A kill
    leaves at most a cut-off last record, which readers skip. `purge_step`: the step a
    resumed run starts at; readers then drop what the killed run logged at or after it, so
    no curve shows a step twice.
    """
    # Imported when used: tensorboardX imports torch when it is installed, seconds of
    # start-up that reading a run directory does not need.
    import tensorboardX  # pylint: disable=import-outside-toplevel
    # tensorboardX names a file by the second it opens it and truncates one of the same name:
    # the suffix keeps two writers of one second (training, then the final results) apart,
    # and sorts them in the order they were opened, the order readers apply them in.
    return tensorboardX.SummaryWriter(logdir=self.file(EVENTS_DIR), purge_step=purge_step,
                                      filename_suffix=f".{time.time_ns()}")


def read_memory_bank_file(path: str) -> MemoryBank:
  """A memory bank .npz written by `RunDir.write_memory_bank`, validated."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No HierCore memory bank at {path!r}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {key: np.asarray(data[key]) for key in data.files}
  except Exception as e:  # zipfile/numpy raise several unrelated types on corrupt input
    raise ValueError(f"HierCore memory bank {path!r} is not a readable .npz file "
                     f"({type(e).__name__}: {e}).") from e
  missing = sorted({"features", "counts", "format_version"} - set(arrays))
  if missing:
    raise ValueError(f"HierCore memory bank {path!r} lacks the keys {missing} "
                     f"(has {sorted(arrays)}).")
  if int(arrays["format_version"]) != MEMORY_BANK_FORMAT_VERSION:
    raise ValueError(f"HierCore memory bank {path!r} has format version "
                     f"{int(arrays['format_version'])}; this code reads "
                     f"{MEMORY_BANK_FORMAT_VERSION}.")
  try:
    return MemoryBank.create(arrays["features"], arrays["counts"])
  except ValueError as e:
    raise ValueError(f"HierCore memory bank {path!r} is inconsistent: {e}") from e


def _manager(directory: str, *, create: bool, by_path: bool = False) -> ocp.CheckpointManager:
  """`by_path`: reads the state as a plain tree, so its metadata (shapes) can be listed and a
  part of it (the model variables) restored alone."""
  handlers = None
  if by_path:
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  # Synchronous saves: the train step donates the state's buffers, which an async save
  # could still be reading.
  # Writers remove the temporary folders of saves a kill interrupted; readers leave them.
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=create, cleanup_tmp_directories=create,
      enable_async_checkpointing=False), item_handlers=handlers)


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes the temporary folders of saves that failed (Orbax writes a step into
  '<step>.orbax-checkpoint-tmp-<time>' and renames it once whole)."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _compare_shapes(stored: Any, expected: Any, where: str) -> None:
  stored_shapes = {_path_name(p): tuple(v.shape) for p, v in
                   jax.tree_util.tree_leaves_with_path(stored) if hasattr(v, "shape")}
  expected_shapes = {_path_name(p): tuple(np.shape(v)) for p, v in
                     jax.tree_util.tree_leaves_with_path(expected)}
  problems = []
  # Parameters before BatchNorm statistics: they are what a reader recognises.
  for name in sorted(set(stored_shapes) | set(expected_shapes),
                     key=lambda n: (not n.startswith("params"), n)):
    if name not in stored_shapes:
      problems.append(f"{name}: missing from the checkpoint (the model has "
                      f"{expected_shapes[name]})")
    elif name not in expected_shapes:
      problems.append(f"{name}: in the checkpoint {stored_shapes[name]}, not in the model")
    elif stored_shapes[name] != expected_shapes[name]:
      problems.append(f"{name}: checkpoint {stored_shapes[name]}, model "
                      f"{expected_shapes[name]}")
  if problems:
    raise ValueError(
        f"The checkpoint in {where} does not fit the model these settings build "
        f"({len(problems)} parameters differ):\n  " + "\n  ".join(problems[:20])
        + ("\n  ..." if len(problems) > 20 else "")
        + "\nThe model settings (model.*, image_size) must match the run that wrote it.")


def _check_shapes(directory: str, step: int, target: Any) -> None:
  manager = _manager(directory, create=False, by_path=True)
  stored = manager.item_metadata(step)["state"]
  manager.close()
  wanted = {"params": target.params, "batch_stats": target.batch_stats}
  _compare_shapes({"params": stored["params"], "batch_stats": stored["batch_stats"]},
                  wanted, directory)
