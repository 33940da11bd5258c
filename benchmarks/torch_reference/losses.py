"""RD + CCL losses in eager PyTorch, NCHW: ccl_jax's formulation and the authors' code's.

`kd_loss`, `supcon_loss` and `local_contrastive_loss` compute what ccl_jax/ccl/losses.py
computes (paper Sec. 3.2, Eq. 1-6), with the same masking constants and tie-breaking, so the
two frameworks can be compared to float32 rounding. `authors_global_loss` and
`authors_dense_loss` reproduce the loss forms of the authors' `SCLLoss` and `DenseLoss`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Same finite mask value as ccl_jax.ccl.losses: a fully masked logsumexp row stays finite.
_MASKED = -1e9


def kd_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor]) -> torch.Tensor:
  """Sum over scales of the batch mean of 1 - cos(flatten(enc[b]), flatten(dec[b]))."""
  total = 0.0
  for e, d in zip(encoder, decoder):
    total = total + (1.0 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
  return total


def supcon_loss(embeddings: torch.Tensor, class_ids: torch.Tensor,
                temperature: float) -> torch.Tensor:
  """Supervised contrastive loss L_out; self excluded; anchors without positives left out."""
  z = F.normalize(embeddings, dim=1)
  logits = z @ z.T / temperature
  not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
  log_denominator = torch.logsumexp(logits.masked_fill(~not_self, _MASKED), 1, keepdim=True)
  log_prob = logits - log_denominator
  positives = (class_ids[:, None] == class_ids[None, :]) & not_self
  num_positives = positives.sum(1)
  per_anchor = -torch.where(positives, log_prob, 0.0).sum(1) / num_positives.clamp(min=1)
  has_positive = num_positives > 0
  return torch.where(has_positive, per_anchor, 0.0).sum() / has_positive.sum().clamp(min=1)


def match_positions(query: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
  """Flat index (y * W + x) of the most cosine-similar key position per query position.

  query, keys: [B, C, H, W]. window: odd k (k x k neighbourhood, clipped at the border) or
  None (whole map). The windowed search loops over the k*k offsets keeping a running argmax
  with a strict '>', so ties go to the first offset in row-major order, as in ccl_jax.
  """
  with torch.no_grad():
    q = F.normalize(query, dim=1)
    k = F.normalize(keys, dim=1)
    b, _, h, w = q.shape
    if window is None:
      return torch.einsum("bcp,bcq->bpq", q.flatten(2), k.flatten(2)).argmax(-1)
    r = window // 2
    padded = F.pad(k, (r, r, r, r))
    ys = torch.arange(h, device=q.device)[:, None]
    xs = torch.arange(w, device=q.device)[None, :]
    best = torch.full((b, h, w), -torch.inf, device=q.device)
    best_index = torch.zeros((b, h, w), dtype=torch.long, device=q.device)
    for dy in range(-r, r + 1):
      for dx in range(-r, r + 1):
        similarity = (q * padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]).sum(1)
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        similarity = similarity.masked_fill(~inside, -torch.inf)
        better = similarity > best
        best = torch.where(better, similarity, best)
        best_index = torch.where(better, (ty * w + tx).expand(b, h, w), best_index)
    return best_index.flatten(1)


def local_contrastive_loss(projected: torch.Tensor, projected_aug: torch.Tensor,
                           encoder: torch.Tensor, encoder_aug: torch.Tensor,
                           class_ids: torch.Tensor, *, window: int | None, temperature: float,
                           negatives: str = "all") -> torch.Tensor:
  """ccl_jax's local loss for one scale (the augmented positive only).

  Positive: projected_aug[i] at the position matched on encoder features; negatives:
  projected_aug[j] at the same position for other-class images j ('all', or 'one_random'
  drawn with torch's RNG); -log softmax of the positive, mean over positions, then over
  images that have a negative.
  """
  b, c = projected.shape[:2]
  anchor = F.normalize(projected, dim=1).flatten(2)        # [B, C, P]
  keys_aug = F.normalize(projected_aug, dim=1).flatten(2)  # [B, C, P]
  match = match_positions(encoder, encoder_aug, window)    # [B, P]
  positive = keys_aug.gather(2, match[:, None, :].expand(-1, c, -1))
  positive_logits = (anchor * positive).sum(1) / temperature  # [B, P]
  other_class = class_ids[:, None] != class_ids[None, :]
  if negatives == "one_random":
    scores = torch.rand((b, b), device=anchor.device)
    chosen = torch.where(other_class, scores, -1.0).argmax(1)
    other_class = other_class & (torch.arange(b, device=anchor.device)[None, :]
                                 == chosen[:, None])
  negative_logits = torch.einsum("icp,jcp->ijp", anchor, keys_aug) / temperature
  negative_logits = negative_logits.masked_fill(~other_class[..., None], _MASKED)
  logits = torch.cat([positive_logits[:, None], negative_logits], 1)  # [B, 1 + B, P]
  per_position = torch.logsumexp(logits, 1) - positive_logits
  has_negative = other_class.any(1)
  per_image = per_position.mean(1)
  return torch.where(has_negative, per_image, 0.0).sum() / has_negative.sum().clamp(min=1)


def authors_global_loss(embeddings: torch.Tensor, class_ids: torch.Tensor,
                        temperature: float) -> torch.Tensor:
  """The authors' SCLLoss form: log-softmax over the whole row (self included), mean
  log-probability of the same-class entries (self included) plus that of the other-class
  entries."""
  z = F.normalize(embeddings, dim=1)
  log_prob = F.log_softmax(z @ z.T / temperature, dim=-1)
  positive = (class_ids[:, None] == class_ids[None, :]).float()
  negative = 1.0 - positive
  positive_loss = -(positive * log_prob).sum(-1) / (positive.sum(-1) + 1e-6)
  negative_loss = -(negative * log_prob).sum(-1) / (negative.sum(-1) + 1e-6)
  return positive_loss.mean() + negative_loss.mean()


def authors_dense_loss(encoder: torch.Tensor, encoder_aug: torch.Tensor,
                       projected: torch.Tensor, projected_aug: torch.Tensor,
                       class_ids: torch.Tensor, temperature: float) -> torch.Tensor:
  """The authors' DenseLoss for one scale, step by step as their code runs it.

  Whole-map argmax matching through a (B, HW, HW) similarity tensor; one random other-class
  image per anchor chosen in a Python loop (a host sync per image); the scale's loss is 0 as
  soon as one image has no other-class image in the batch; -log(e^p / (e^p + e^n + 1e-6)).
  """
  q = F.normalize(encoder, dim=1).flatten(2)
  k = F.normalize(encoder_aug, dim=1).flatten(2)
  match = torch.einsum("bci,bcj->bij", q, k).argmax(-1)
  q_grid = F.normalize(projected, dim=1).flatten(2)
  k_grid = F.normalize(projected_aug, dim=1).flatten(2)
  c = q_grid.shape[1]
  positive = F.cosine_similarity(
      q_grid, k_grid.gather(2, match[:, None, :].expand(-1, c, -1)), dim=1) / temperature
  negatives = []
  for i in range(q_grid.shape[0]):
    candidates = torch.where(class_ids != class_ids[i].item())[0]
    if len(candidates) == 0:
      return torch.zeros((), device=q_grid.device)
    chosen = candidates[torch.randint(0, len(candidates), (1,))]
    negatives.append(F.cosine_similarity(q_grid[i][None], k_grid[chosen], dim=1))
  negative = torch.cat(negatives, 0) / temperature
  loss = -torch.log(torch.exp(positive) / (torch.exp(positive) + torch.exp(negative) + 1e-6))
  return loss.mean()
