"""The jitted training and inference steps, and the state they carry.

`train_step(state, encoder_variables, batch) -> (state, metrics)` is one jitted,
state-donating function. Under a 1-D ('data') mesh the batch is sharded over devices and
everything else replicated; jit's global view makes BatchNorm statistics, gradients and the
cross-batch contrastive similarities span the whole global batch, so the step computes
exactly what it computes on one device. The frozen encoder is a separate argument: it is
neither optimised nor checkpointed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ccl_jax import augment, losses, scoring
import flax.linen as nn

from ccl_jax.models import ReverseDistillation, input_normalisation


class TrainState(train_state.TrainState):
  """Optimised parameters, BatchNorm statistics and the step's PRNG key."""
  batch_stats: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """Everything the loss needs to know, as plain values (hashable: a jit static argument).

  local_weight, global_weight: lambda_1 and lambda_2 (both 0 = the RD baseline, which then
    skips the augmented view entirely).
  temperature: tau of both contrastive losses.
  window: local matching window (odd int) or None for the whole map.
  local_negatives: 'all' other-class images (paper) or 'one_random' (authors' code).
  same_class_positive: add the paper's second local positive.
  global_views: 'both' views in the global loss (paper) or 'original' only (authors' code).
  """
  local_weight: float = 1.0
  global_weight: float = 1.0
  temperature: float = 0.1
  window: int | None = None
  local_negatives: Literal["all", "one_random"] = "all"
  same_class_positive: bool = False
  global_views: Literal["both", "original"] = "both"

  @property
  def uses_augmented_view(self) -> bool:
    return self.local_weight > 0 or self.global_weight > 0


def data_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process, axis 'data'.

  Auto axis types: XLA propagates the batch sharding through the step and inserts the
  cross-device reductions (BatchNorm statistics, gradients, contrastive similarities).
  """
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def make_optimizer(*, projector_learning_rate: float, learning_rate: float, b1: float,
                   b2: float, clip_norm: float) -> optax.GradientTransformation:
  """Adam with the projector on its own learning rate, after global-norm clipping."""
  def label(params):
    return {name: jax.tree_util.tree_map(lambda _: "projector" if name == "projector"
                                         else "rest", subtree)
            for name, subtree in params.items()}
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.multi_transform({
          "projector": optax.adam(projector_learning_rate, b1=b1, b2=b2),
          "rest": optax.adam(learning_rate, b1=b1, b2=b2),
      }, label))


def create_train_state(model: ReverseDistillation, encoder: nn.Module, encoder_variables,
                       tx: optax.GradientTransformation, image_size: int,
                       rng: jax.Array) -> TrainState:
  """Initial state (call under jit with replicated out_shardings to create it sharded)."""
  init_key, state_key = jax.random.split(rng)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  features = encoder.apply(encoder_variables, images)
  variables = model.init(init_key, features)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx, rng=state_key)


def encode(encoder: nn.Module, encoder_variables, images: jax.Array):
  """Frozen encoder features of RGB images (uint8, or float in [0, 1]), normalised as the
  encoder's weights expect; no gradient reaches the encoder."""
  mean, std = input_normalisation(encoder)
  features = encoder.apply(encoder_variables, augment.normalize(images, mean, std))
  return tuple(jax.lax.stop_gradient(f) for f in features)


def gradients(state: TrainState, encoder_variables, batch: dict[str, jax.Array], *,
              encoder: nn.Module, settings: LossSettings):
  """Gradients of the total loss, the loss terms and the updated BatchNorm statistics
  for a batch {'image': uint8 [B,H,W,3], 'class_id': int32 [B]}.

  An optional 'image_aug' (float [B,H,W,3] in [0, 1]) replaces the on-device augmentation
  with a given second view: parity tests and benchmarks feed both frameworks the same one.
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  aug_key, noise_key, negative_key = jax.random.split(step_key, 3)
  images01 = batch["image"].astype(jnp.float32) / 255.0
  class_ids = batch["class_id"]
  batch_size = images01.shape[0]
  if settings.uses_augmented_view:
    # Both views through the encoder in one call: it is in inference mode, so stacking
    # them changes nothing but the launch count.
    augmented = batch.get("image_aug")
    if augmented is None:
      augmented = augment.augment_batch(aug_key, images01)
    views = jnp.concatenate([images01, augmented.astype(jnp.float32)])
    both = encode(encoder, encoder_variables, views)
    features = tuple(f[:batch_size] for f in both)
    features_aug = tuple(f[batch_size:] for f in both)
  else:
    features = encode(encoder, encoder_variables, images01)
    features_aug = None
  embed_augmented = settings.global_weight > 0 and settings.global_views == "both"

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, features, features_aug,
        embed_augmented, method="training_outputs", mutable=["batch_stats"],
        rngs={"noise": noise_key})
    kd = losses.kd_loss(features, outputs.decoder_features)
    local = []
    if settings.local_weight > 0:
      scale_keys = jax.random.split(negative_key, len(features))
      local = [losses.local_contrastive_loss(
          p, pa, e, ea, class_ids, window=settings.window, temperature=settings.temperature,
          negatives=settings.local_negatives, key=k,
          same_class_positive=settings.same_class_positive)
               for p, pa, e, ea, k in zip(outputs.projected, outputs.projected_aug, features,
                                          features_aug, scale_keys)]
    global_ = jnp.zeros((), jnp.float32)
    if settings.global_weight > 0:
      if embed_augmented:
        embeddings = jnp.concatenate([outputs.embedding, outputs.embedding_aug])
        ids = jnp.concatenate([class_ids, class_ids])
      else:
        embeddings, ids = outputs.embedding, class_ids
      global_ = losses.global_contrastive_loss(embeddings, ids, settings.temperature)
    terms = losses.total_loss(kd, local, global_, local_weight=settings.local_weight,
                              global_weight=settings.global_weight)
    return terms.total, (terms, updates["batch_stats"])

  grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  return grads, terms, batch_stats


def train_step(state: TrainState, encoder_variables, batch: dict[str, jax.Array], *,
               encoder: nn.Module, settings: LossSettings
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a batch {'image': uint8 [B,H,W,3], 'class_id': int32 [B]}."""
  grads, terms, batch_stats = gradients(state, encoder_variables, batch, encoder=encoder,
                                        settings=settings)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": terms.total, "kd": terms.kd, "local": terms.local,
             "global": terms.global_, "grad_norm": optax.tree.norm(grads)}
  return state, metrics


def predict(variables, encoder_variables, images: jax.Array, *, model: ReverseDistillation,
            encoder: nn.Module) -> dict[str, jax.Array]:
  """Inference on uint8 images [B,H,W,3]: anomaly maps, image scores and per-image KD loss."""
  features = encode(encoder, encoder_variables, images)
  reconstruction = model.apply(variables, features, train=False)
  maps = scoring.anomaly_map(features, reconstruction, images.shape[1:3])
  return {"anomaly_map": maps, "score": scoring.image_score(maps),
          "kd": losses.kd_loss(features, reconstruction, per_sample=True)}


def embed(variables, encoder_variables, images: jax.Array, *,
          encoder: nn.Module) -> dict[str, jax.Array]:
  """Image-level encoder embedding (spatial mean of the deepest feature map) of uint8 images;
  `variables` (the trained model's) is unused: the signature matches `predict`."""
  del variables
  features = encode(encoder, encoder_variables, images)
  return {"embedding": jnp.mean(features[-1], axis=(1, 2))}


def jit_train_step(encoder: nn.Module, settings: LossSettings) -> Callable:
  """The jitted step; the state argument is donated so its buffers are updated in place."""
  return jax.jit(functools.partial(train_step, encoder=encoder, settings=settings),
                 donate_argnums=0)


def jit_predict(model: ReverseDistillation, encoder: nn.Module) -> Callable:
  return jax.jit(functools.partial(predict, model=model, encoder=encoder))


def variables_of(state: TrainState) -> dict[str, Any]:
  return flax.core.freeze({"params": state.params, "batch_stats": state.batch_stats})
