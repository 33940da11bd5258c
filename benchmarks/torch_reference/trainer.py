"""The PyTorch training step of RD + CCL, in two modes, and the weight bridge to ccl_jax.

mode="minimal" computes exactly what ccl_jax.ccl.step.gradients computes:
  * the frozen encoder runs once on both views stacked (eval-mode BatchNorm, no gradient);
  * the projector runs once on both views stacked (InstanceNorm is per sample);
  * feature noise on the original view's projected features with `noise_probability`
    (N(0, 1) at a random half of the positions; 0 for parity runs);
  * the neck runs on the original view, and on the augmented view only when the global loss
    uses both views (each call with its own BatchNorm batch statistics);
  * losses: KD (sum over scales), local contrastive loss with `window` (odd int, or None for
    the whole map) and negatives 'all' or 'one_random', averaged over scales, supervised
    contrastive global loss over both views ('both') or the original only ('original').

mode="authors" mirrors LGC-AD/AD-LGC (model/rd.py RDLGC.train_forward, loss/base_loss.py,
trainer/rdlgc_trainer.py) as it runs, including the work whose result is never used:
  * the encoder runs twice, once per view; the projector runs twice, once per view;
  * feature noise: with probability P(N(0,1) > 0.5) ~ 0.309 per step (`torch.randn(1) > 0.5`)
    N(0, 1) noise is added in place to the projected original-view features at the positions
    of a random {0, 1} mask (B, 1, H, W); this reaches the neck and the local loss;
  * the neck runs on both views; the augmented view's pooled embedding is computed and never
    used by any loss (it only costs time and moves the BatchNorm running statistics);
  * KD as above (their CosLoss with avg=False sums the scales);
  * local loss (their DenseLoss): whole-map argmax matching through a (B, HW, HW) similarity,
    one random other-class negative per anchor picked in a Python loop with a host sync per
    image, -log(e^p / (e^p + e^n + 1e-6)), 0 for a scale as soon as one image has no
    other-class image; averaged over scales;
  * global loss (their SCLLoss) on the original view only: log-softmax over the whole row,
    self included in both the denominator and the positives, plus a mean over negatives;
  * window, local_negatives, global_views and noise_probability are fixed by their code; the
    arguments must keep their defaults or name the authors' values.

Both modes share the optimiser of the authors' trainer and ccl_jax's default config: Adam,
betas (0.5, 0.999), no weight decay, lr 1e-3 for the projector and 5e-3 for neck + decoder
(the authors keep two Adam instances over the two groups, which is the same update as one
Adam with two parameter groups), after clipping the global gradient norm to 5.0.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from benchmarks.torch_reference import losses
from benchmarks.torch_reference.models import RDCCL
from ccl_jax.weights import convert
from ccl_jax.models import AUTHORS_NOISE_PROBABILITY, ReverseDistillation, encoder_spec

PROJECTOR_LEARNING_RATE = 1e-3
LEARNING_RATE = 5e-3
BETAS = (0.5, 0.999)
CLIP_NORM = 5.0
BLUR_SIGMA = 4.0
# What mode="authors" accepts for the settings their code hard-wires: (default, authors').
_AUTHORS_FIXED = {"window": (None,), "local_negatives": ("all", "one_random"),
                  "global_views": ("both", "original"),
                  "noise_probability": (0.0, AUTHORS_NOISE_PROBABILITY)}


class TorchTrainer:
  """A PyTorch RD + CCL model with its optimiser and one of the two training steps.

  Attributes:
    model: the RDCCL module (state dict in the authors' layout).
    optimizer: Adam over (projector, neck + decoder) parameter groups.
    encoder: the encoder name, e.g. 'wide_resnet50_2'.
  """

  def __init__(self, encoder: str, *, mode: str, window: int | None, local_negatives: str,
               global_views: str, noise_probability: float, temperature: float,
               local_weight: float, global_weight: float, compiled: bool):
    self.encoder = encoder
    self.mode = mode
    self.window = window
    self.local_negatives = local_negatives
    self.global_views = global_views
    self.noise_probability = noise_probability
    self.temperature = temperature
    self.local_weight = local_weight
    self.global_weight = global_weight
    self.model = RDCCL(encoder).train()
    projector, rest = self.model.trainable_groups()
    self.optimizer = torch.optim.Adam(
        [{"params": projector, "lr": PROJECTOR_LEARNING_RATE},
         {"params": rest, "lr": LEARNING_RATE}], betas=BETAS)
    self._parameters = projector + rest
    self._step = torch.compile(self._step_tensors) if compiled else self._step_tensors
    self._compiled = compiled

  # ------------------------------------------------------------------ training
  def loss_terms(self, images: torch.Tensor, images_aug: torch.Tensor,
                 class_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss terms {kd, local, global_, total} as 0-d tensors with the graph kept.

    images, images_aug: float32 [B, 3, H, W] in [0, 1]; class_ids: int64 [B].
    """
    if self.mode == "authors":
      return self._authors_terms(images, images_aug, class_ids)
    return self._minimal_terms(images, images_aug, class_ids)

  def train_step(self, images: torch.Tensor, images_aug: torch.Tensor,
                 class_ids: torch.Tensor) -> dict[str, float]:
    """Forward, backward, gradient clipping and one Adam step; returns the loss terms."""
    try:
      terms = self._step(images, images_aug, class_ids)
    except Exception as error:  # torch.compile raises many backend-specific types
      if not self._compiled:
        raise
      raise RuntimeError(
          f"torch.compile of the {self.mode} training step failed on this machine "
          f"({type(error).__name__}: {error}). Inductor on CPU needs a working C++ compiler; "
          "build the trainer with compiled=False to run the eager step.") from error
    return {k: float(v) for k, v in terms.items()}

  def _step_tensors(self, images: torch.Tensor, images_aug: torch.Tensor,
                    class_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    self.optimizer.zero_grad(set_to_none=True)
    terms = self.loss_terms(images, images_aug, class_ids)
    terms["total"].backward()
    torch.nn.utils.clip_grad_norm_(self._parameters, CLIP_NORM)
    self.optimizer.step()
    return {k: v.detach() for k, v in terms.items()}

  def _minimal_terms(self, images, images_aug, class_ids):
    model = self.model
    batch = images.shape[0]
    uses_aug = self.local_weight > 0 or self.global_weight > 0
    if uses_aug:
      both = model.encode(torch.cat([images, images_aug]))
      features, features_aug = [f[:batch] for f in both], [f[batch:] for f in both]
      projected_both = model.proj_layer(both)
      projected = [p[:batch] for p in projected_both]
      projected_aug = [p[batch:] for p in projected_both]
    else:
      features, features_aug = model.encode(images), None
      projected, projected_aug = model.proj_layer(features), None
    if self.noise_probability > 0 and float(torch.rand(())) < self.noise_probability:
      projected = [p + torch.randn_like(p) * torch.randint(0, 2, (p.shape[0], 1) + p.shape[2:],
                                                           device=p.device)
                   for p in projected]
    bottleneck = model.mff_oce(projected)
    embed_aug = self.global_weight > 0 and self.global_views == "both"
    bottleneck_aug = model.mff_oce(projected_aug) if embed_aug else None
    decoded = model.net_s(bottleneck)
    kd = losses.kd_loss(features, decoded)
    zero = torch.zeros((), device=images.device)
    local = zero
    if self.local_weight > 0:
      local = sum(losses.local_contrastive_loss(
          p, pa, e, ea, class_ids, window=self.window, temperature=self.temperature,
          negatives=self.local_negatives)
                  for p, pa, e, ea in zip(projected, projected_aug, features, features_aug)
                  ) / len(features)
    global_ = zero
    if self.global_weight > 0:
      embedding = bottleneck.mean((2, 3))
      ids = class_ids
      if embed_aug:
        embedding = torch.cat([embedding, bottleneck_aug.mean((2, 3))])
        ids = torch.cat([class_ids, class_ids])
      global_ = losses.supcon_loss(embedding, ids, self.temperature)
    total = kd + self.local_weight * local + self.global_weight * global_
    return {"kd": kd, "local": local, "global_": global_, "total": total}

  def _authors_terms(self, images, images_aug, class_ids):
    model = self.model
    features = model.encode(images)
    features_aug = model.encode(images_aug)
    projected = model.proj_layer(features)
    projected_aug = model.proj_layer(features_aug)
    if torch.randn(1) > 0.5:
      for i, f in enumerate(features):
        b, _, h, w = f.shape
        mask = torch.randint(0, 2, (b, 1, h, w), device=f.device)
        projected[i] += torch.randn_like(f) * mask
    bottleneck = model.mff_oce(projected)
    bottleneck_aug = model.mff_oce(projected_aug)
    decoded = model.net_s(bottleneck)
    embedding = F.adaptive_avg_pool2d(bottleneck, 1).squeeze()
    F.adaptive_avg_pool2d(bottleneck_aug, 1).squeeze()  # computed and unused, as theirs
    kd = losses.kd_loss(features, decoded)
    local = sum(losses.authors_dense_loss(e, ea, p, pa, class_ids, self.temperature)
                for e, ea, p, pa in zip(features, features_aug, projected, projected_aug)
                ) / len(features)
    global_ = losses.authors_global_loss(embedding, class_ids, self.temperature)
    total = kd + self.local_weight * local + self.global_weight * global_
    return {"kd": kd, "local": local, "global_": global_, "total": total}

  # ----------------------------------------------------------------- inference
  @torch.no_grad()
  def anomaly_maps(self, images: torch.Tensor) -> np.ndarray:
    """Anomaly maps [B, H, W] as the authors score: per scale 1 - cos(enc, dec) along
    channels, bilinear upsampling with align_corners=True, summed over scales, Gaussian
    blur sigma 4 (scipy, per image). mode='authors' also divides by 9 as their evaluator
    does (len(scales) * sum(weights)), a constant no metric sees."""
    was_training = self.model.training
    self.model.eval()
    try:
      features = self.model.encode(images)
      decoded = self.model.net_s(self.model.mff_oce(self.model.proj_layer(features)))
    finally:
      self.model.train(was_training)
    size = images.shape[2:]
    total = np.zeros((images.shape[0], *size), np.float64)
    for e, d in zip(features, decoded):
      scale_map = 1.0 - F.cosine_similarity(e, d, dim=1)[:, None]
      total += F.interpolate(scale_map, size=size, mode="bilinear",
                             align_corners=True)[:, 0].cpu().numpy()
    if self.mode == "authors":
      total /= len(features) * len(features)
    return np.stack([scipy.ndimage.gaussian_filter(m, sigma=BLUR_SIGMA) for m in total])


def build_trainer(encoder: str, *, image_size: int, mode: str = "minimal",
                  window: int | None = None, local_negatives: str = "all",
                  global_views: str = "both", noise_probability: float = 0.0,
                  temperature: float = 0.1, local_weight: float = 1.0,
                  global_weight: float = 1.0, seed: int = 0,
                  compiled: bool = False) -> TorchTrainer:
  """A freshly initialised PyTorch RD + CCL trainer (see the module docstring for modes).

  Args:
    encoder: 'resnet18', 'resnet34', 'resnet50' or 'wide_resnet50_2' (random weights; load a
      state dict into `trainer.model.net_t` for ImageNet ones).
    image_size: input side; must be a multiple of 32 (the neck halves the stride-16 map).
    mode: 'minimal' (ccl_jax's computation) or 'authors' (their code as it runs).
    window, local_negatives, global_views, noise_probability: the local matching window
      (odd int or None), 'all' | 'one_random', 'both' | 'original', and the per-step chance
      of feature noise; mode='authors' fixes all four.
    temperature, local_weight, global_weight: tau, lambda_1, lambda_2.
    seed: torch seed for the initial weights (and the later random draws).
    compiled: wrap the whole step (forward, backward, clip, Adam) in torch.compile; a
      failure to compile is raised from the first train_step with an explanation.
  """
  if mode not in ("minimal", "authors"):
    raise ValueError(f"mode must be 'minimal' or 'authors', got {mode!r}.")
  if image_size % 32:
    raise ValueError(f"image_size must be a multiple of 32, got {image_size}.")
  if window is not None and (not isinstance(window, int) or window < 1 or window % 2 == 0):
    raise ValueError(f"window must be None or a positive odd int, got {window!r}.")
  if local_negatives not in ("all", "one_random"):
    raise ValueError(f"local_negatives must be 'all' or 'one_random', got {local_negatives!r}.")
  if global_views not in ("both", "original"):
    raise ValueError(f"global_views must be 'both' or 'original', got {global_views!r}.")
  if not 0.0 <= noise_probability <= 1.0:
    raise ValueError(f"noise_probability must be in [0, 1], got {noise_probability}.")
  if mode == "authors":
    given = {"window": window, "local_negatives": local_negatives,
             "global_views": global_views, "noise_probability": noise_probability}
    fixed = {k: v for k, v in given.items() if v not in _AUTHORS_FIXED[k]}
    if fixed:
      raise ValueError(f"mode='authors' hard-wires {sorted(fixed)} (whole-map matching, one "
                       "random negative, original-view global loss, noise p~0.309); leave "
                       f"them at their defaults. Got {fixed}.")
  torch.manual_seed(seed)
  return TorchTrainer(encoder, mode=mode, window=window, local_negatives=local_negatives,
                      global_views=global_views, noise_probability=noise_probability,
                      temperature=temperature, local_weight=local_weight,
                      global_weight=global_weight, compiled=compiled)


# --------------------------------------------------------------------- ccl_jax bridge
def jax_model(encoder: str) -> ReverseDistillation:
  """The ccl_jax model matching RDCCL(encoder): projector, neck of base width 64 (the
  authors'), decoder at the encoder's width."""
  spec = encoder_spec(encoder)
  return ReverseDistillation(spec, use_projector=True,
                             neck_width_per_group=convert.CCL_NECK_WIDTH_PER_GROUP,
                             decoder_width_per_group=spec.width_per_group)


def _model_variables(state: dict[str, np.ndarray], encoder: str) -> dict[str, Any]:
  """An RDCCL-layout state dict -> ccl_jax model variables through ccl_jax.weights.convert.

  Bottleneck encoders go through the public `ccl_variables` (the authors' RDLGC layout);
  ccl_jax's `ccl_model` refuses basic-block encoders (the authors' code has no such model),
  so those use the same converter core with the same prefixes and `jax_model`'s template.
  """
  if encoder_spec(encoder).block == "bottleneck":
    return convert.ccl_variables(state, encoder, source="torch reference")
  prefixes = {"mff_oce.": ("neck",), "net_s.": ("decoder",)}
  for scale in "abc":
    prefixes[f"proj_layer.proj_{scale}.proj."] = ("projector", f"proj_{scale}")
  return convert._convert(state, prefixes, ("net_t.",),  # pylint: disable=protected-access
                          convert._rd_template(jax_model(encoder)),  # pylint: disable=protected-access
                          "torch reference", f"the CCL model for {encoder}")


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def jax_variables(trainer_or_model: TorchTrainer | RDCCL) -> tuple[dict, dict]:
  """(encoder_variables, model_variables) for ccl_jax, converted by ccl_jax.weights.convert from the
  torch model's state dict; the model is `jax_model(encoder)`."""
  model = trainer_or_model.model if isinstance(trainer_or_model, TorchTrainer) else (
      trainer_or_model)
  encoder = model.encoder_name
  state = state_dict_numpy(model)
  return (convert.ccl_encoder_variables(state, encoder, source="torch reference"),
          _model_variables(state, encoder))


def jax_params_tree(model: RDCCL, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-parameter arrays named like `model.named_parameters()` (gradients, updates) as a
  ccl_jax params tree, renamed by ccl_jax.weights.convert; parameters missing from `arrays` are 0
  and the BatchNorm buffers only complete the tree the converter checks."""
  state = state_dict_numpy(model)
  for name, parameter in model.named_parameters():
    if not name.startswith("net_t."):
      state[name] = arrays.get(name, np.zeros(tuple(parameter.shape), np.float32))
  return _model_variables(state, model.encoder_name)["params"]


def jax_gradients(model: RDCCL) -> dict[str, Any]:
  """The torch model's current .grad as a ccl_jax params tree."""
  return jax_params_tree(model, {name: p.grad.detach().cpu().numpy()
                                 for name, p in model.named_parameters() if p.grad is not None})
