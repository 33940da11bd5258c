"""Tests for ccl_jax.datasets.input_pipeline (CPU only, fast)."""

import itertools
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from ccl_jax.datasets import input_pipeline as ip

S = 4  # Image side of the fake source.


class FakeSource:
  """Small in-memory, picklable random-access source.

  The image of record i encodes i (channel 0: i % 256, channel 1: i // 256);
  accesses are counted (per process) to check that skipped steps are not
  read.
  """

  def __init__(self, class_ids, labels=None):
    self.class_ids = np.asarray(class_ids, dtype=np.int32)
    n = self.class_ids.size
    self.labels = (np.zeros(n, np.int32) if labels is None else
                   np.asarray(labels, np.int32))
    self.reads = 0
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return self.class_ids.size

  def __getitem__(self, i):
    with self._lock:
      self.reads += 1
    image = np.zeros((S, S, 3), np.uint8)
    image[..., 0] = i % 256
    image[..., 1] = i // 256
    image[..., 2] = self.class_ids[i]
    mask = np.zeros((S, S), np.uint8)
    mask[0, 0] = self.labels[i]
    mask[1, 1] = i % 2
    return {
        "image": image,
        "mask": mask,
        "class_id": np.int32(self.class_ids[i]),
        "class_name": f"class{self.class_ids[i]}",
        "label": np.int32(self.labels[i]),
        "defect_type": "good" if self.labels[i] == 0 else "crack",
        "file_name": f"{i:05d}.png",
    }


def decode_index(images):
  images = np.asarray(images).astype(np.int64)
  return images[:, 0, 0, 0] + 256 * images[:, 0, 0, 1]


def take(iterator, n):
  out = list(itertools.islice(iterator, n))
  iterator.close()
  return out


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]),
                                    err_msg=k)


def skewed_class_ids(sizes, seed=0):
  ids = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
  return np.random.default_rng(seed).permutation(ids)


# --------------------------------------------------------------------------
# class_mixed_epoch / steps_per_epoch
# --------------------------------------------------------------------------


def check_epoch(order, indices, class_of, batch_size):
  """Checks the class_mixed_epoch contract; returns #classes per batch."""
  n = len(indices)
  assert order.size == (n // batch_size) * batch_size
  assert np.unique(order).size == order.size  # Each index at most once.
  assert np.isin(order, indices).all()
  batches = order.reshape(-1, batch_size)
  return np.array([np.unique(class_of[b]).size for b in batches])


@pytest.mark.parametrize("sizes,batch_size", [
    ([950, 50], 32),  # 95% / 5%.
    ([900, 100], 16),  # 90% / 10%.
    ([850, 60, 45, 30, 15], 16),
    ([300, 300, 300], 8),
    ([21, 20], 2),  # Tight: 20 batches, 20 samples outside class 0.
])
def test_every_batch_mixed_for_skewed_classes(sizes, batch_size):
  class_ids = skewed_class_ids(sizes, seed=7)
  n = class_ids.size
  # Non-trivial source indices: a sparse, shuffled subset.
  indices = np.random.default_rng(1).permutation(n * 3)[:n].astype(np.int64)
  class_of = np.full(n * 3, -1)
  class_of[indices] = class_ids
  first_batches = set()
  for seed in range(100):
    order = ip.class_mixed_epoch(class_ids, indices, batch_size,
                                 np.random.default_rng(seed))
    classes_per_batch = check_epoch(order, indices, class_of, batch_size)
    assert classes_per_batch.min() >= 2, (seed, classes_per_batch)
    dropped = np.setdiff1d(indices, order)
    assert dropped.size == n % batch_size
    first_batches.add(tuple(order[:batch_size]))
  assert len(first_batches) > 90  # Really shuffled.


def test_every_batch_mixed_random_configurations():
  """Property test: mixing succeeds exactly when it is feasible."""
  rng = np.random.default_rng(0)
  for trial in range(400):
    k = int(rng.integers(2, 5))
    sizes = rng.integers(1, 40, size=k)
    sizes[0] = int(rng.integers(1, 200))  # Often a dominant class.
    class_ids = skewed_class_ids(sizes, seed=trial)
    n = class_ids.size
    batch_size = int(rng.integers(1, min(n, 24) + 1))
    feasible = n - sizes.max() >= n // batch_size
    epoch_rng = np.random.default_rng(trial)
    if not feasible:
      with pytest.raises(ValueError, match="Cannot mix"):
        ip.class_mixed_epoch(class_ids, np.arange(n), batch_size, epoch_rng)
      continue
    order = ip.class_mixed_epoch(class_ids, np.arange(n), batch_size,
                                 epoch_rng)
    classes_per_batch = check_epoch(order, np.arange(n), class_ids,
                                    batch_size)
    assert classes_per_batch.min() >= 2, (trial, sizes, batch_size)


def test_class_mixed_epoch_single_class_and_errors():
  indices = np.arange(100, 150)
  order = ip.class_mixed_epoch(np.zeros(50, np.int32), indices, 8,
                               np.random.default_rng(0))
  assert order.size == 48 and np.unique(order).size == 48
  assert np.isin(order, indices).all()
  assert not np.array_equal(order, indices[:48])

  with pytest.raises(ValueError, match=r"5 samples < batch_size 8"):
    ip.class_mixed_epoch(np.arange(5), np.arange(5), 8,
                         np.random.default_rng(0))
  with pytest.raises(ValueError, match="Cannot mix"):  # 95/5 with batch 16.
    ip.class_mixed_epoch(skewed_class_ids([95, 5]), np.arange(100), 16,
                         np.random.default_rng(0))
  with pytest.raises(ValueError, match="same length"):
    ip.class_mixed_epoch(np.arange(5), np.arange(6), 2,
                         np.random.default_rng(0))


def test_class_mixed_epoch_deterministic():
  class_ids = skewed_class_ids([50, 20, 10])
  a = ip.class_mixed_epoch(class_ids, np.arange(80), 8,
                           np.random.default_rng([5, 1]))
  b = ip.class_mixed_epoch(class_ids, np.arange(80), 8,
                           np.random.default_rng([5, 1]))
  np.testing.assert_array_equal(a, b)


def test_steps_and_eval_batch_counts():
  assert ip.steps_per_epoch(100, 16) == 6
  assert ip.steps_per_epoch(96, 16) == 6
  assert ip.steps_per_epoch(5, 16) == 0
  assert ip.num_eval_batches(100, 16) == 7
  assert ip.num_eval_batches(96, 16) == 6
  assert ip.num_eval_batches(0, 16) == 0
  with pytest.raises(ValueError):
    ip.steps_per_epoch(10, 0)


# --------------------------------------------------------------------------
# train_batches
# --------------------------------------------------------------------------

TRAIN_CLASS_IDS = skewed_class_ids([30, 8, 5], seed=2)  # 43 images.


def make_train_inputs():
  source = FakeSource(TRAIN_CLASS_IDS)
  # Train on a shuffled subset (as after holdout_split).
  indices = np.random.default_rng(0).permutation(43)[:37]
  return source, indices, TRAIN_CLASS_IDS[indices]


def test_train_batches_shapes_epochs_and_mixing():
  source, indices, class_of = make_train_inputs()
  g = 8
  spe = ip.steps_per_epoch(len(indices), g)
  assert spe == 4
  batches = take(ip.train_batches(source, indices, class_of,
                                  global_batch_size=g, seed=11), 3 * spe)
  for batch in batches:
    assert set(batch) == {"image", "class_id"}
    assert batch["image"].shape == (g, S, S, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["class_id"].shape == (g,)
    assert batch["class_id"].dtype == np.int32
    seen = decode_index(batch["image"])
    # class_id is the class of the decoded record and batches are mixed.
    np.testing.assert_array_equal(batch["class_id"], TRAIN_CLASS_IDS[seen])
    assert np.unique(batch["class_id"]).size >= 2
  for e in range(3):
    seen = np.concatenate(
        [decode_index(b["image"]) for b in batches[e * spe:(e + 1) * spe]])
    assert np.unique(seen).size == spe * g  # At most once per epoch...
    assert np.isin(seen, indices).all()  # ...and only training indices.
    # Exactly the epoch order of class_mixed_epoch with rng([seed, e]).
    expected = ip.class_mixed_epoch(class_of, indices, g,
                                    np.random.default_rng([11, e]))
    np.testing.assert_array_equal(seen, expected)
  # Epochs differ.
  assert not np.array_equal(decode_index(batches[0]["image"]),
                            decode_index(batches[spe]["image"]))


class ScaledSource(FakeSource):
  """The same records at twice the side (a source prepared at a larger size)."""

  def __getitem__(self, i):
    record = super().__getitem__(i)
    record["image"] = np.repeat(np.repeat(record["image"], 2, 0), 2, 1)
    return record


def test_shuffle_sampler_is_a_plain_shuffle_and_carries_the_view_source():
  # One class of 30 images and one of 2: class mixing cannot mix every batch of 8 and
  # refuses; the plain shuffle runs and yields single-class batches.
  class_ids = np.array([0] * 30 + [1] * 2)
  source, indices = FakeSource(class_ids), np.arange(32)
  with pytest.raises(ValueError, match="Cannot mix classes"):
    ip.train_batches(source, indices, class_ids, global_batch_size=8, seed=3)
  view_source = ScaledSource(class_ids)
  batches = take(ip.train_batches(source, indices, class_ids, global_batch_size=8, seed=3,
                                  sampler="shuffle", view_source=view_source), 8)
  for e in range(2):
    seen = np.concatenate([decode_index(b["image"]) for b in batches[4 * e:4 * e + 4]])
    np.testing.assert_array_equal(
        seen, ip.shuffled_epoch(32, 8, np.random.default_rng([3, e])))
  assert any(np.unique(b["class_id"]).size == 1 for b in batches)
  for b in batches:
    assert b["image_source"].shape == (8, 2 * S, 2 * S, 3)
    np.testing.assert_array_equal(b["image_source"][:, ::2, ::2], b["image"])
  with pytest.raises(ValueError, match="sampler must be one of"):
    ip.train_batches(source, indices, class_ids, global_batch_size=8, seed=3,
                     sampler="stratified")


def test_train_batches_resume_matches_tail():
  source, indices, class_of = make_train_inputs()
  kwargs = dict(global_batch_size=8, seed=5)
  full = take(ip.train_batches(source, indices, class_of, **kwargs), 14)
  for start in (1, 3, 4, 6):  # Within epoch 0, at and across boundaries.
    resumed = take(ip.train_batches(source, indices, class_of,
                                    start_step=start, **kwargs), 14 - start)
    assert_batches_equal(resumed, full[start:])


def test_train_batches_resume_skips_without_reading():
  source, indices, class_of = make_train_inputs()
  spe = 4
  start = 10_000 * spe + 2
  it = ip.train_batches(source, indices, class_of, global_batch_size=8,
                        seed=5, start_step=start, read_num_threads=0,
                        prefetch_buffer_size=0)
  first = next(it)
  it.close()
  assert source.reads == 8  # Only the 8 rows of the first yielded batch.
  expected = ip.class_mixed_epoch(class_of, indices, 8,
                                  np.random.default_rng([5, 10_000]))
  np.testing.assert_array_equal(decode_index(first["image"]),
                                expected[16:24])


def test_train_batches_process_split():
  source, indices, class_of = make_train_inputs()
  kwargs = dict(global_batch_size=8, seed=9, start_step=2)
  n_steps = 7  # Crosses an epoch boundary.
  full = take(ip.train_batches(source, indices, class_of, **kwargs), n_steps)
  per_process = [
      take(ip.train_batches(source, indices, class_of, process_index=p,
                            process_count=4, **kwargs), n_steps)
      for p in range(4)
  ]
  for step in range(n_steps):
    for key in ("image", "class_id"):
      parts = [per_process[p][step][key] for p in range(4)]
      assert parts[0].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate(parts), full[step][key])
  with pytest.raises(ValueError, match="multiple of process_count"):
    ip.train_batches(source, indices, class_of, global_batch_size=8, seed=0,
                     process_count=3)


def test_train_batches_errors():
  source, indices, class_of = make_train_inputs()
  with pytest.raises(ValueError, match=r"37 samples < batch_size 64"):
    ip.train_batches(source, indices, class_of, global_batch_size=64, seed=0)
  with pytest.raises(ValueError, match="Cannot mix"):
    ip.train_batches(source, indices, class_of, global_batch_size=1, seed=0)


# --------------------------------------------------------------------------
# eval_batches
# --------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_batches_cover_each_index_once(process_count):
  n_src = 40
  labels = (np.arange(n_src) % 3 == 0).astype(np.int32)
  class_ids = np.arange(n_src) % 4
  source = FakeSource(class_ids, labels)
  indices = np.random.default_rng(3).permutation(n_src)[:23]
  g = 6
  n_batches = ip.num_eval_batches(len(indices), g)
  assert n_batches == 4
  b = g // process_count
  valid_positions = []
  for p in range(process_count):
    batches = list(ip.eval_batches(source, indices, global_batch_size=g,
                                   process_index=p,
                                   process_count=process_count))
    assert len(batches) == n_batches
    for k, batch in enumerate(batches):
      assert batch["image"].shape == (b, S, S, 3)
      assert batch["image"].dtype == np.uint8
      assert batch["mask"].shape == (b, S, S)
      assert batch["mask"].dtype == np.uint8
      for key, dtype in [("label", np.int32), ("class_id", np.int32),
                         ("index", np.int32), ("valid", np.bool_)]:
        assert batch[key].shape == (b,) and batch[key].dtype == dtype, key
      valid = batch["valid"]
      pos = batch["index"]
      expected_pos = k * g + p * b + np.arange(b)  # In index order.
      np.testing.assert_array_equal(valid, expected_pos < len(indices))
      np.testing.assert_array_equal(pos[valid], expected_pos[valid])
      assert np.all(pos[~valid] == -1)
      src = indices[pos[valid]]
      np.testing.assert_array_equal(decode_index(batch["image"][valid]), src)
      np.testing.assert_array_equal(batch["label"][valid], labels[src])
      np.testing.assert_array_equal(batch["class_id"][valid], class_ids[src])
      np.testing.assert_array_equal(batch["mask"][valid][:, 0, 0],
                                    labels[src])
      valid_positions.append(pos[valid])
  allpos = np.sort(np.concatenate(valid_positions))
  np.testing.assert_array_equal(allpos, np.arange(len(indices)))


def test_eval_batches_small_and_empty():
  source = FakeSource(np.zeros(5, np.int32))
  batches = list(ip.eval_batches(source, np.arange(2), global_batch_size=4,
                                 process_index=1, process_count=2))
  assert len(batches) == 1
  assert not batches[0]["valid"].any()  # Process 1 only holds padding.
  np.testing.assert_array_equal(batches[0]["index"], [-1, -1])
  assert list(ip.eval_batches(source, np.arange(0), global_batch_size=4)) == []


def test_eval_batches_follow_a_given_layout():
  source = FakeSource(np.zeros(10, np.int32))
  indices = np.arange(10)[::-1]
  # Process 0 gets positions 0-5, process 1 positions 6-9 then padding.
  layout = np.array([[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, -1, -1]])
  for p in range(2):
    batches = list(ip.eval_batches(source, indices, global_batch_size=4, layout=layout,
                                   process_index=p, process_count=2))
    for batch, row in zip(batches, layout):
      np.testing.assert_array_equal(batch["index"], row[2 * p:2 * p + 2])
      np.testing.assert_array_equal(batch["valid"], row[2 * p:2 * p + 2] >= 0)
      valid = batch["valid"]
      np.testing.assert_array_equal(decode_index(batch["image"][valid]),
                                    indices[batch["index"][valid]])
  twice = layout.copy()
  twice[2, 2] = 0
  with pytest.raises(ValueError, match="each of the 10 positions exactly once"):
    ip.eval_batches(source, indices, global_batch_size=4, layout=twice)
  with pytest.raises(ValueError, match=r"shape \[num_batches, 4\]"):
    ip.eval_batches(source, indices, global_batch_size=4, layout=layout.reshape(4, 3))


# --------------------------------------------------------------------------
# to_global_array (8 simulated CPU devices, in a fresh interpreter)
# --------------------------------------------------------------------------


_GLOBAL_ARRAY_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update('jax_num_cpu_devices', 8)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ccl_jax.datasets import input_pipeline as ip
    from tests.test_input_pipeline import FakeSource

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ('data',))
    sharding = NamedSharding(mesh, P('data'))
    source = FakeSource(np.arange(30) % 3)
    batch = next(iter(ip.eval_batches(source, np.arange(30),
                                      global_batch_size=16)))
    out = ip.to_global_array(batch, sharding)
    assert set(out) == set(batch)
    for k, v in out.items():
      assert isinstance(v, jax.Array), k
      assert v.shape == batch[k].shape and v.dtype == batch[k].dtype, k
      assert v.sharding == sharding, k
      assert len(v.addressable_shards) == 8, k
      for shard in v.addressable_shards:
        assert shard.data.shape[0] == 2, k
      np.testing.assert_array_equal(np.asarray(v), batch[k])
    # Training batches too, and a jitted reduction over the global batch.
    it = ip.train_batches(source, np.arange(30), np.arange(30) % 3,
                          global_batch_size=16, seed=0)
    tb = next(it)
    it.close()
    tg = ip.to_global_array(tb, sharding)
    total = jax.jit(lambda x: x.astype(np.int32).sum())(tg['class_id'])
    assert int(total) == int(tb['class_id'].sum())
    print('GLOBAL_OK')
""")


def test_to_global_array_8_cpu_devices():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  result = subprocess.run([sys.executable, "-c", _GLOBAL_ARRAY_SCRIPT],
                          cwd=root, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "GLOBAL_OK" in result.stdout


# --------------------------------------------------------------------------
# Multiprocessing workers
# --------------------------------------------------------------------------


def test_worker_count_1_matches_in_process():
  source, indices, class_of = make_train_inputs()
  kwargs = dict(global_batch_size=8, seed=3, start_step=3, process_index=1,
                process_count=2)
  expected = take(ip.train_batches(source, indices, class_of, **kwargs), 6)
  got = take(ip.train_batches(source, indices, class_of, worker_count=1,
                              **kwargs), 6)
  assert_batches_equal(got, expected)


def test_eval_worker_count_1_matches_in_process():
  source = FakeSource(np.arange(20) % 3)
  indices = np.arange(3, 20)
  kwargs = dict(global_batch_size=6, process_index=0, process_count=2)
  expected = list(ip.eval_batches(source, indices, **kwargs))
  got = list(ip.eval_batches(source, indices, worker_count=1, **kwargs))
  assert len(expected) == ip.num_eval_batches(len(indices), 6) == 3
  assert_batches_equal(got, expected)
