"""Losses of RD + CCL (paper Sec. 3.2, Eq. 1-6; the KD loss of RD4AD). All arrays are NHWC.

Every function is pure and jittable. Shape problems are caught at trace time with a
ValueError; NaN/Inf values cannot be rejected inside a jitted step, so they propagate to the
loss, where the training loop detects them on the host and stops with a clear message.
Similarities are computed in float32 or wider, whatever the compute dtype.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# Large but finite: a fully masked row must give a finite logsumexp so that gradients
# through jnp.where stay finite (an -inf there turns them into NaN).
_MASKED = -1e9


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalise along the last axis (torch.nn.functional.normalize semantics)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _check_feature_lists(name_a: str, a: Sequence[jax.Array], name_b: str,
                         b: Sequence[jax.Array]) -> None:
  if len(a) != len(b) or not a:
    raise ValueError(f"{name_a} and {name_b} must be non-empty lists with one array per scale; "
                     f"got {len(a)} and {len(b)} scales.")
  for i, (x, y) in enumerate(zip(a, b)):
    if x.ndim != 4 or x.shape != y.shape:
      raise ValueError(f"Scale {i}: {name_a} and {name_b} must be [B, H, W, C] arrays of the "
                       f"same shape; got {x.shape} and {y.shape}.")


def kd_loss(encoder_features: Sequence[jax.Array], decoder_features: Sequence[jax.Array],
            *, per_sample: bool = False) -> jax.Array:
  """RD's distillation loss: sum over scales of the batch mean of 1 - cos(enc[b], dec[b]).

  The cosine is taken between one sample's whole flattened map (H*W*C values). With
  `per_sample` the batch mean is left out and a [B] array is returned (for masked means).
  """
  _check_feature_lists("encoder_features", encoder_features, "decoder_features",
                       decoder_features)
  total = 0.0
  for enc, dec in zip(encoder_features, decoder_features):
    e = _normalize(enc.reshape(enc.shape[0], -1))
    d = _normalize(dec.reshape(dec.shape[0], -1))
    total = total + 1.0 - jnp.sum(e * d, axis=-1)
  return total if per_sample else jnp.mean(total)


def _check_embeddings(embeddings: jax.Array, class_ids: jax.Array, temperature: float) -> None:
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}.")
  if class_ids.shape != embeddings.shape[:1]:
    raise ValueError(f"class_ids must be [N] = [{embeddings.shape[0]}], got {class_ids.shape}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")


def global_contrastive_loss(embeddings: jax.Array, class_ids: jax.Array,
                            temperature: float) -> jax.Array:
  """Supervised contrastive loss (Khosla et al. 2020, L_out; paper Eq. 1 and 5).

  Args:
    embeddings: [N, D]; the caller stacks both views so each anchor's other view is a
      positive.
    class_ids: [N] integer class (or pseudo-class) ids.
    temperature: tau > 0.

  For anchor i the positives are all j != i with the same class and the denominator sums
  over all j != i. Anchors without any positive are left out of the mean; if no anchor has
  one the loss is 0.
  """
  _check_embeddings(embeddings, class_ids, temperature)
  z = _normalize(embeddings)
  logits = z @ z.T / temperature
  n = z.shape[0]
  not_self = ~jnp.eye(n, dtype=bool)
  log_denominator = jax.nn.logsumexp(jnp.where(not_self, logits, _MASKED), axis=1,
                                     keepdims=True)
  log_prob = logits - log_denominator
  positives = (class_ids[:, None] == class_ids[None, :]) & not_self
  num_positives = jnp.sum(positives, axis=1)
  per_anchor = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / jnp.maximum(
      num_positives, 1)
  has_positive = num_positives > 0
  return jnp.sum(jnp.where(has_positive, per_anchor, 0.0)) / jnp.maximum(
      jnp.sum(has_positive), 1)


def authors_global_loss(embeddings: jax.Array, class_ids: jax.Array,
                        temperature: float) -> jax.Array:
  """The global loss of the authors' code (LGC-AD/AD-LGC loss/base_loss.py `SCLLoss`).

  With log p_ij = log_softmax_j(<z_i, z_j> / tau) over the WHOLE row (self included):
  mean_i[-mean_{j same class} log p_ij] + mean_i[-mean_{j other class} log p_ij], where
  "same class" includes j = i, and each mean over j divides by (count + 1e-6) as theirs
  does. Unlike SupCon (`global_contrastive_loss`) it rewards other-class similarity too:
  at tau 0.05 it is lowest with other-class embeddings at cosine ~0.9, not -1.
  """
  _check_embeddings(embeddings, class_ids, temperature)
  z = _normalize(embeddings)
  log_prob = jax.nn.log_softmax(z @ z.T / temperature, axis=-1)
  same = (class_ids[:, None] == class_ids[None, :]).astype(log_prob.dtype)
  other = 1.0 - same

  def mean_over(mask):
    return -jnp.sum(mask * log_prob, axis=-1) / (jnp.sum(mask, axis=-1) + 1e-6)

  return jnp.mean(mean_over(same)) + jnp.mean(mean_over(other))


def _check_window(window: int | None) -> None:
  if window is not None and (not isinstance(window, int) or window < 1 or window % 2 == 0):
    raise ValueError(f"window must be None (whole map) or a positive odd int, got {window!r}.")


# Largest similarity block the whole-map search materialises at once (64 MiB of float32):
# the full [B, HW, HW] matrix is 1 GiB at the paper setting's 64x64 scale, and it would be
# live next to every activation the backward pass keeps.
WHOLE_MAP_BLOCK_ELEMENTS = 2**24


def _whole_map_argmax(query: jax.Array, keys: jax.Array,
                      block_elements: int = WHOLE_MAP_BLOCK_ELEMENTS) -> jax.Array:
  """argmax_q <query[b, p], keys[b, q]> for [B, P, C] arrays, over blocks of query rows.

  The blocks save memory where XLA runs them one after another: on the CPU that takes its
  memory-minimising schedule (`ccl_jax.runtime.xla_options`); its concurrent default holds every
  block at once. A Python loop rather than lax.map, because XLA's cost analysis counts a
  loop body once and the benchmarks' FLOP/s figures come from it.
  """
  b, p, _ = query.shape
  rows = max(1, min(p, block_elements // (b * keys.shape[1])))
  return jnp.concatenate([
      jnp.argmax(jnp.einsum("bpc,bqc->bpq", query[:, start:start + rows], keys), axis=-1)
      for start in range(0, p, rows)], axis=1).astype(jnp.int32)


def match_positions(query: jax.Array, keys: jax.Array, window: int | None) -> jax.Array:
  """For each query position, the flat index (y * W + x) of the most similar key position.

  Args:
    query, keys: [B, H, W, C] features, compared by cosine similarity image by image.
    window: odd k: search the k x k neighbourhood of the query position (clipped at the
      border); None: search the whole map.

  The windowed search scans the k*k offsets with lax.scan, keeping a running argmax, so it
  never builds the (H*W) x (H*W) similarity matrix nor a k*k-times copy of the keys. Ties
  go to the first offset in row-major order. No gradient flows through the indices.
  """
  _check_window(window)
  b, h, w, c = query.shape
  q = jax.lax.stop_gradient(_normalize(query))
  k = jax.lax.stop_gradient(_normalize(keys))
  if window is None:
    return _whole_map_argmax(q.reshape(b, h * w, c), k.reshape(b, h * w, c))

  r = window // 2
  k_padded = jnp.pad(k, ((0, 0), (r, r), (r, r), (0, 0)))
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  dy, dx = jnp.meshgrid(jnp.arange(-r, r + 1), jnp.arange(-r, r + 1), indexing="ij")
  offsets = jnp.stack([dy.ravel(), dx.ravel()], axis=1)

  def scan_offset(carry, offset):
    best_similarity, best_index = carry
    shifted = jax.lax.dynamic_slice(k_padded, (0, r + offset[0], r + offset[1], 0), (b, h, w, c))
    similarity = jnp.sum(q * shifted, axis=-1)
    ty, tx = ys + offset[0], xs + offset[1]
    inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
    similarity = jnp.where(inside[None], similarity, -jnp.inf)
    better = similarity > best_similarity
    index = jnp.broadcast_to(ty * w + tx, (b, h, w)).astype(jnp.int32)
    return (jnp.where(better, similarity, best_similarity),
            jnp.where(better, index, best_index)), None

  init = (jnp.full((b, h, w), -jnp.inf, q.dtype), jnp.zeros((b, h, w), jnp.int32))
  (_, best_index), _ = jax.lax.scan(scan_offset, init, offsets)
  return best_index.reshape(b, h * w)


def _gather_positions(features: jax.Array, index: jax.Array) -> jax.Array:
  """features [B, P, C], index [B, P] -> features[b, index[b, p]] as [B, P, C]."""
  return jnp.take_along_axis(features, index[..., None], axis=1)


def same_class_partner(class_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each image, the next other image of its class in batch order (cyclically).

  Returns (partner index [B], has_partner [B]); images alone in their class get themselves
  and has_partner False.
  """
  b = class_ids.shape[0]
  i = jnp.arange(b)
  distance = (i[None, :] - i[:, None]) % b  # steps forward from i to j, self = 0
  candidates = (class_ids[:, None] == class_ids[None, :]) & (distance > 0)
  partner = jnp.argmin(jnp.where(candidates, distance, b), axis=1)
  has_partner = jnp.any(candidates, axis=1)
  return jnp.where(has_partner, partner, i), has_partner


def local_contrastive_loss(projected: jax.Array, projected_aug: jax.Array, encoder: jax.Array,
                           encoder_aug: jax.Array, class_ids: jax.Array, *,
                           window: int | None, temperature: float,
                           negatives: Literal["all", "one_random"] = "all",
                           key: jax.Array | None = None,
                           same_class_positive: bool = False) -> jax.Array:
  """Local (dense) class-aware contrastive loss for one scale (paper Eq. 2-4, Fig. 4).

  For image i and position p: the positive is projected_aug[i] at the position q of the
  window around p (None: whole map) that maximises cos(encoder[i, p], encoder_aug[i, q]);
  the negatives are projected_aug[j, p] for every image j of another class; the score is
  -log(e^{s+/t} / (e^{s+/t} + sum_neg e^{s-/t})) with cosine similarities s. The mean runs
  over (i, p) for images that have an other-class partner; 0 if none has one.

  Args:
    projected, projected_aug: [B, H, W, C] projector outputs of both views.
    encoder, encoder_aug: [B, H, W, Ce] encoder features used only to choose the positive.
    class_ids: [B].
    window: positive odd int, or None for the whole map.
    temperature: tau > 0.
    negatives: 'all' (the paper's Eq. 1 denominator) or 'one_random' (the authors' code:
      one random other-class image per anchor; needs `key`).
    same_class_positive: also use the paper's second positive, the best windowed match
      in another image of the same class (its original view), in the L_out form with
      both positives; images alone in their class keep only the augmented positive.
  """
  if projected.ndim != 4 or projected.shape != projected_aug.shape:
    raise ValueError("projected and projected_aug must be [B, H, W, C] of the same shape; got "
                     f"{projected.shape} and {projected_aug.shape}.")
  if encoder.ndim != 4 or encoder.shape != encoder_aug.shape or encoder.shape[:3] != (
      projected.shape[:3]):
    raise ValueError("encoder and encoder_aug must be [B, H, W, C'] with the projected "
                     f"features' B, H, W {projected.shape[:3]}; got {encoder.shape} and "
                     f"{encoder_aug.shape}.")
  if class_ids.shape != projected.shape[:1]:
    raise ValueError(f"class_ids must be [B] = [{projected.shape[0]}], got {class_ids.shape}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if negatives not in ("all", "one_random"):
    raise ValueError(f"negatives must be 'all' or 'one_random', got {negatives!r}.")
  if negatives == "one_random" and key is None:
    raise ValueError("negatives='one_random' needs a PRNG key.")
  _check_window(window)

  b, h, w, c = projected.shape
  anchor = _normalize(projected).reshape(b, h * w, c)
  keys_aug = _normalize(projected_aug).reshape(b, h * w, c)

  match = match_positions(encoder, encoder_aug, window)
  positive_logits = [jnp.sum(anchor * _gather_positions(keys_aug, match), -1) / temperature]
  positive_valid = [jnp.ones((b,), bool)]
  if same_class_positive:
    partner, has_partner = same_class_partner(class_ids)
    partner_match = match_positions(encoder, encoder[partner], window)
    partner_keys = anchor[partner]
    positive_logits.append(
        jnp.sum(anchor * _gather_positions(partner_keys, partner_match), -1) / temperature)
    positive_valid.append(has_partner)
  positive_logits = jnp.stack(positive_logits, axis=1)           # [B, P, HW]
  positive_valid = jnp.stack(positive_valid, axis=1)[..., None]  # [B, P, 1]

  other_class = class_ids[:, None] != class_ids[None, :]          # [B, B]
  if negatives == "one_random":
    scores = jax.random.uniform(key, (b, b))
    chosen = jnp.argmax(jnp.where(other_class, scores, -1.0), axis=1)
    other_class = other_class & (jnp.arange(b)[None, :] == chosen[:, None])
  negative_logits = jnp.einsum("ipc,jpc->ijp", anchor, keys_aug) / temperature
  negative_logits = jnp.where(other_class[..., None], negative_logits, _MASKED)

  all_logits = jnp.concatenate(
      [jnp.where(positive_valid, positive_logits, _MASKED), negative_logits], axis=1)
  log_denominator = jax.nn.logsumexp(all_logits, axis=1)            # [B, HW]
  log_prob = positive_logits - log_denominator[:, None, :]
  per_position = -jnp.sum(jnp.where(positive_valid, log_prob, 0.0), axis=1) / jnp.sum(
      positive_valid, axis=1)
  has_negative = jnp.any(other_class, axis=1)
  per_image = jnp.mean(per_position, axis=1)
  return jnp.sum(jnp.where(has_negative, per_image, 0.0)) / jnp.maximum(
      jnp.sum(has_negative), 1)


class LossTerms(NamedTuple):
  total: jax.Array
  kd: jax.Array
  local: jax.Array   # averaged over scales
  global_: jax.Array


def total_loss(kd: jax.Array, local_per_scale: Sequence[jax.Array], global_: jax.Array, *,
               local_weight: float, global_weight: float) -> LossTerms:
  """L = L_KD + l1 * mean_over_scales(L_local) + l2 * L_global (paper Eq. 6)."""
  local = (sum(local_per_scale) / len(local_per_scale) if local_per_scale
           else jnp.zeros((), jnp.float32))
  return LossTerms(total=kd + local_weight * local + global_weight * global_,
                   kd=kd, local=local, global_=global_)
