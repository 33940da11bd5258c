"""Losses against plain numpy references written here, loop by loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax.ccl import losses


def _cos(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def kd_reference(enc, dec):
  total = 0.0
  for e, d in zip(enc, dec):
    total += np.mean([1 - _cos(e[b].ravel(), d[b].ravel()) for b in range(e.shape[0])])
  return total


def supcon_reference(emb, ids, t):
  n = len(ids)
  per_anchor = []
  for i in range(n):
    pos = [j for j in range(n) if j != i and ids[j] == ids[i]]
    if not pos:
      continue
    denom = sum(np.exp(_cos(emb[i], emb[a]) / t) for a in range(n) if a != i)
    per_anchor.append(-np.mean([np.log(np.exp(_cos(emb[i], emb[p]) / t) / denom) for p in pos]))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def best_match(query, keys, y, x, window):
  h, w, _ = keys.shape
  best, best_pos = -np.inf, None
  for ty in range(h):
    for tx in range(w):
      if window is not None and (abs(ty - y) > window // 2 or abs(tx - x) > window // 2):
        continue
      s = _cos(query[y, x], keys[ty, tx])
      if s > best + 1e-12:
        best, best_pos = s, (ty, tx)
  return best_pos


def local_reference(proj, proj_aug, enc, enc_aug, ids, window, t, same_class_positive=False,
                    negatives=None):
  b, h, w, _ = proj.shape
  per_image = []
  for i in range(b):
    negs = [j for j in range(b) if ids[j] != ids[i]] if negatives is None else negatives[i]
    if not negs:
      continue
    partner = None
    if same_class_positive:
      later = [(j - i) % b for j in range(b) if j != i and ids[j] == ids[i]]
      partner = (i + min(later)) % b if later else None
    losses_i = []
    for y in range(h):
      for x in range(w):
        ty, tx = best_match(enc[i], enc_aug[i], y, x, window)
        positives = [_cos(proj[i, y, x], proj_aug[i, ty, tx]) / t]
        if partner is not None:
          py, px = best_match(enc[i], enc[partner], y, x, window)
          positives.append(_cos(proj[i, y, x], proj[partner, py, px]) / t)
        negative = [_cos(proj[i, y, x], proj_aug[j, y, x]) / t for j in negs]
        denom = sum(np.exp(s) for s in positives + negative)
        losses_i.append(-np.mean([np.log(np.exp(s) / denom) for s in positives]))
    per_image.append(np.mean(losses_i))
  return float(np.mean(per_image)) if per_image else 0.0


def _features(rng, b, h, w, c):
  return rng.normal(size=(b, h, w, c)).astype(np.float32)


def test_kd_loss_matches_reference():
  rng = np.random.default_rng(0)
  enc = [_features(rng, 3, 8, 8, 4), _features(rng, 3, 4, 4, 8), _features(rng, 3, 2, 2, 16)]
  dec = [e + 0.5 * rng.normal(size=e.shape).astype(np.float32) for e in enc]
  got = losses.kd_loss([jnp.asarray(e) for e in enc], [jnp.asarray(d) for d in dec])
  np.testing.assert_allclose(got, kd_reference(enc, dec), rtol=1e-5)
  assert float(losses.kd_loss(enc, enc)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_rejects_mismatched_scales():
  a = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="one array per scale"):
    losses.kd_loss([a, a], [a])
  with pytest.raises(ValueError, match="same shape"):
    losses.kd_loss([a], [jnp.zeros((2, 4, 4, 5))])
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    losses.kd_loss([jnp.zeros((4, 4, 3))], [jnp.zeros((4, 4, 3))])


def test_global_loss_matches_reference():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(10, 6)).astype(np.float32)
  ids = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 1])  # class 3 has no positive: left out
  for t in (0.05, 0.1, 0.5):
    got = losses.global_contrastive_loss(jnp.asarray(emb), jnp.asarray(ids), t)
    np.testing.assert_allclose(got, supcon_reference(emb, ids, t), rtol=1e-5)


def authors_scl_reference(emb, ids, t):
  """The authors' SCLLoss, one anchor and one partner at a time: the row's softmax runs over
  every j (self included); same-class partners include the anchor itself."""
  n = len(ids)
  positive_terms, negative_terms = [], []
  for i in range(n):
    logits = [_cos(emb[i], emb[j]) / t for j in range(n)]
    log_denominator = np.log(sum(np.exp(v) for v in logits))
    same = [logits[j] - log_denominator for j in range(n) if ids[j] == ids[i]]
    other = [logits[j] - log_denominator for j in range(n) if ids[j] != ids[i]]
    positive_terms.append(-sum(same) / (len(same) + 1e-6))
    negative_terms.append(-sum(other) / (len(other) + 1e-6))
  return float(np.mean(positive_terms) + np.mean(negative_terms))


def test_authors_global_loss_matches_their_form_loop_by_loop():
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(10, 6)).astype(np.float32)
  ids = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 1])
  for t in (0.05, 0.1, 0.5):
    got = losses.authors_global_loss(jnp.asarray(emb), jnp.asarray(ids), t)
    np.testing.assert_allclose(got, authors_scl_reference(emb, ids, t), rtol=1e-5)
  # One class: no other-class term (0 / 1e-6), only the self-inclusive positive mean.
  one_class = np.zeros(10, int)
  np.testing.assert_allclose(
      losses.authors_global_loss(jnp.asarray(emb), jnp.asarray(one_class), 0.1),
      authors_scl_reference(emb, one_class, 0.1), rtol=1e-5)


def test_authors_global_loss_rewards_other_class_similarity_that_supcon_penalises():
  # Two classes of two unit vectors each, the classes at an angle: SupCon falls as the
  # classes move apart, the authors' form (its other-class term) rises.
  def embeddings(theta):
    a = np.array([1.0, 0.0])
    b = np.array([np.cos(theta), np.sin(theta)])
    return jnp.asarray(np.stack([a, a, b, b]), jnp.float32)
  ids = jnp.asarray([0, 0, 1, 1])
  angles = np.linspace(0.05, np.pi, 12)
  supcon = np.array([losses.global_contrastive_loss(embeddings(a), ids, 0.05) for a in angles])
  authors = np.array([losses.authors_global_loss(embeddings(a), ids, 0.05) for a in angles])
  assert np.all(np.diff(supcon) <= 1e-6) and supcon[0] > supcon[-1] + 1.0
  assert np.all(np.diff(authors) > 0)


def test_global_loss_without_positives_is_zero_with_finite_gradient():
  emb = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
  ids = jnp.arange(4)
  value, grad = jax.value_and_grad(losses.global_contrastive_loss)(emb, ids, 0.1)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad))


def test_global_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    losses.global_contrastive_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2,), int), 0.1)
  with pytest.raises(ValueError, match="class_ids"):
    losses.global_contrastive_loss(jnp.zeros((4, 3)), jnp.zeros((3,), int), 0.1)
  with pytest.raises(ValueError, match="temperature"):
    losses.global_contrastive_loss(jnp.zeros((4, 3)), jnp.zeros((4,), int), 0.0)


@pytest.mark.parametrize("window", [1, 3, 5, None])
def test_local_loss_matches_reference(window):
  rng = np.random.default_rng(3)
  b, h, w = 5, 5, 6
  proj, proj_aug = _features(rng, b, h, w, 4), _features(rng, b, h, w, 4)
  enc = _features(rng, b, h, w, 3)
  enc_aug = enc + 0.7 * _features(rng, b, h, w, 3)
  ids = np.array([0, 1, 0, 2, 1])
  got = losses.local_contrastive_loss(proj, proj_aug, enc, enc_aug, jnp.asarray(ids),
                                      window=window, temperature=0.1)
  want = local_reference(proj, proj_aug, enc, enc_aug, ids, window, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("window", [3, None])
def test_local_loss_same_class_positive_matches_reference(window):
  rng = np.random.default_rng(4)
  b, h, w = 5, 4, 4
  proj, proj_aug = _features(rng, b, h, w, 4), _features(rng, b, h, w, 4)
  enc, enc_aug = _features(rng, b, h, w, 3), _features(rng, b, h, w, 3)
  ids = np.array([0, 1, 0, 2, 0])  # image 3 is alone in its class: one positive only
  got = losses.local_contrastive_loss(proj, proj_aug, enc, enc_aug, jnp.asarray(ids),
                                      window=window, temperature=0.2, same_class_positive=True)
  want = local_reference(proj, proj_aug, enc, enc_aug, ids, window, 0.2,
                         same_class_positive=True)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_local_loss_one_random_negative_uses_one_other_class_image():
  rng = np.random.default_rng(5)
  b, h, w = 4, 3, 3
  proj, proj_aug = _features(rng, b, h, w, 4), _features(rng, b, h, w, 4)
  enc, enc_aug = _features(rng, b, h, w, 3), _features(rng, b, h, w, 3)
  ids = np.array([0, 1, 1, 2])
  key = jax.random.key(0)
  got = float(losses.local_contrastive_loss(proj, proj_aug, enc, enc_aug, jnp.asarray(ids),
                                            window=1, temperature=0.1, negatives="one_random",
                                            key=key))
  # The same draw, reproduced: the loss must equal the reference for one of the possible
  # choices of one negative per image.
  candidates = []
  import itertools
  options = [[j for j in range(b) if ids[j] != ids[i]] for i in range(b)]
  for choice in itertools.product(*options):
    candidates.append(local_reference(proj, proj_aug, enc, enc_aug, ids, 1, 0.1,
                                      negatives=[[j] for j in choice]))
  assert min(abs(got - c) for c in candidates) < 1e-4
  all_negatives = local_reference(proj, proj_aug, enc, enc_aug, ids, 1, 0.1)
  assert abs(got - all_negatives) > 1e-3


def test_local_loss_single_class_is_zero():
  rng = np.random.default_rng(6)
  x = _features(rng, 3, 4, 4, 2)
  value, grad = jax.value_and_grad(losses.local_contrastive_loss)(
      jnp.asarray(x), jnp.asarray(x), x, x, jnp.zeros((3,), jnp.int32), window=3,
      temperature=0.1)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad))


def test_windowed_matching_never_builds_the_dense_similarity():
  x = jnp.zeros((2, 32, 32, 8))
  hlo = jax.jit(lambda a, b: losses.match_positions(a, b, 3)).lower(x, x).as_text()
  assert "1024x1024" not in hlo
  # The check can fail: the whole-map search does build it.
  dense = jax.jit(lambda a, b: losses.match_positions(a, b, None)).lower(x, x).as_text()
  assert "1024x1024" in dense


@pytest.mark.parametrize("block_elements", [1, 2 * 20 * 3, 2 * 20 * 7, 2**24])
def test_whole_map_search_in_blocks_equals_dense_argmax(block_elements):
  rng = np.random.default_rng(8)
  query, keys = _features(rng, 2, 4, 5, 6), _features(rng, 2, 4, 5, 6)
  q, k = (jnp.asarray(x).reshape(2, 20, 6) for x in (query, keys))
  dense = np.argmax(np.einsum("bpc,bqc->bpq", q, k), axis=-1)
  np.testing.assert_array_equal(losses._whole_map_argmax(q, k, block_elements), dense)


def test_whole_map_search_never_builds_a_block_above_its_budget():
  x = jnp.zeros((16, 64, 64, 8))  # [16, 4096, 4096] = 2**28 similarities in one block
  hlo = jax.jit(lambda a, b: losses.match_positions(a, b, None)).lower(x, x).as_text()
  assert "16x4096x4096" not in hlo
  rows = losses.WHOLE_MAP_BLOCK_ELEMENTS // (16 * 4096)
  assert f"16x{rows}x4096" in hlo


def test_window_larger_than_map_equals_whole_map():
  rng = np.random.default_rng(7)
  a, b = _features(rng, 2, 4, 5, 3), _features(rng, 2, 4, 5, 3)
  np.testing.assert_array_equal(losses.match_positions(a, b, 9),
                                losses.match_positions(a, b, None))


def test_local_loss_rejects_bad_input():
  x = jnp.zeros((2, 4, 4, 3))
  ids = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="odd"):
    losses.local_contrastive_loss(x, x, x, x, ids, window=2, temperature=0.1)
  with pytest.raises(ValueError, match="same shape"):
    losses.local_contrastive_loss(x, jnp.zeros((2, 4, 5, 3)), x, x, ids, window=1,
                                  temperature=0.1)
  with pytest.raises(ValueError, match="encoder"):
    losses.local_contrastive_loss(x, x, jnp.zeros((2, 2, 2, 3)), jnp.zeros((2, 2, 2, 3)), ids,
                                  window=1, temperature=0.1)
  with pytest.raises(ValueError, match="key"):
    losses.local_contrastive_loss(x, x, x, x, ids, window=1, temperature=0.1,
                                  negatives="one_random")


def test_nan_features_give_nan_loss_not_a_silent_number():
  x = np.ones((2, 2, 2, 3), np.float32)
  y = x.copy()
  y[0, 0, 0, 0] = np.nan
  assert np.isnan(float(losses.kd_loss([x], [y])))


def test_total_loss_weights_and_scale_average():
  terms = losses.total_loss(jnp.float32(1.0), [jnp.float32(2.0), jnp.float32(4.0),
                                               jnp.float32(6.0)], jnp.float32(3.0),
                            local_weight=0.5, global_weight=2.0)
  assert float(terms.local) == pytest.approx(4.0)
  assert float(terms.total) == pytest.approx(1.0 + 0.5 * 4.0 + 2.0 * 3.0)
