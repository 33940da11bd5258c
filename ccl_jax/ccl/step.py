"""The jitted training step and the state it carries.

`train_step(state, encoder_variables, batch) -> (state, metrics)` is one jitted,
state-donating function. Under a 1-D ('data') mesh the batch is sharded over devices and
everything else replicated; jit's global view makes BatchNorm statistics, gradients and the
cross-batch contrastive similarities span the whole global batch, so the step computes
exactly what it computes on one device. The frozen encoder is a separate argument: it is
neither optimised nor checkpointed.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ccl_jax.ccl import augment, losses
from ccl_jax.models import ReverseDistillation
from ccl_jax.models.frozen import encode
from ccl_jax.config.settings import LossSettings, OptimizerSettings


class TrainState(train_state.TrainState):
  """Optimised parameters, BatchNorm statistics and the step's PRNG key."""
  batch_stats: Any
  rng: jax.Array


@functools.lru_cache(maxsize=8)
def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
  """Adam with the projector on its own learning rate, after global-norm clipping. One
  object per settings: the state's tree structure holds it, so a new one would recompile
  every jitted function of the state."""
  def label(params):
    return {name: jax.tree_util.tree_map(lambda _: "projector" if name == "projector"
                                         else "rest", subtree)
            for name, subtree in params.items()}
  b1, b2 = settings.b1, settings.b2
  return optax.chain(
      optax.clip_by_global_norm(settings.clip_norm),
      optax.multi_transform({
          "projector": optax.adam(settings.projector_learning_rate, b1=b1, b2=b2),
          "rest": optax.adam(settings.learning_rate, b1=b1, b2=b2),
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


def initial_state(network: ReverseDistillation, encoder: nn.Module, encoder_variables,
                  optimizer: OptimizerSettings, image_size: int, seed: int,
                  sharding) -> TrainState:
  """The initial train state, created directly with `sharding` (never whole on one device
  first)."""
  return _jitted_initial_state(network, encoder, optimizer, image_size, sharding)(
      encoder_variables, jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=8)
def _jitted_initial_state(network: ReverseDistillation, encoder: nn.Module,
                          optimizer: OptimizerSettings, image_size: int, sharding):
  tx = make_optimizer(optimizer)
  return jax.jit(lambda enc_vars, key: create_train_state(
      network, encoder, enc_vars, tx, image_size, key), out_shardings=sharding)


def gradients(state: TrainState, encoder_variables, batch: dict[str, jax.Array], *,
              encoder: nn.Module, settings: LossSettings):
  """Gradients of the total loss, the loss terms and the updated BatchNorm statistics
  for a batch {'image': uint8 [B,H,W,3], 'class_id': int32 [B]}.

  An optional 'image_aug' (float [B,H,W,3] in [0, 1]) replaces the on-device augmentation
  with a given second view: parity tests and benchmarks feed both frameworks the same one.
  An optional 'image_source' (uint8 [B,H',W',3], H' > H: the same images prepared larger)
  is what the augmented view is cut from (`augmented_view_source_size`).
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
    if augmented is None and "image_source" in batch:
      augmented = augment.augment_batch(aug_key, batch["image_source"].astype(jnp.float32)
                                        / 255.0, size=images01.shape[1:3])
    elif augmented is None:
      augmented = augment.augment_batch(aug_key, images01)
    views = jnp.concatenate([images01, augmented.astype(jnp.float32)])
    both = encode(encoder, encoder_variables, views)
    features = tuple(f[:batch_size] for f in both)
    features_aug = tuple(f[batch_size:] for f in both)
  else:
    features = encode(encoder, encoder_variables, images01)
    features_aug = None
  embed_augmented = settings.embeds_augmented_view
  global_loss = {"supcon": losses.global_contrastive_loss,
                 "authors": losses.authors_global_loss}[settings.global_form]

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
      if settings.global_views == "both":
        embeddings = jnp.concatenate([outputs.embedding, outputs.embedding_aug])
        ids = jnp.concatenate([class_ids, class_ids])
      else:
        embeddings, ids = outputs.embedding, class_ids
      global_ = global_loss(embeddings, ids, settings.temperature)
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


@functools.lru_cache(maxsize=8)
def jit_train_step(encoder: nn.Module, settings: LossSettings) -> Callable:
  """The jitted step; the state argument is donated so its buffers are updated in place.
  One per encoder and loss, so a resumed run in the same process reuses its compilation."""
  return jax.jit(functools.partial(train_step, encoder=encoder, settings=settings),
                 donate_argnums=0)


def variables_of(state: TrainState) -> dict[str, Any]:
  return flax.core.freeze({"params": state.params, "batch_stats": state.batch_stats})


@jax.jit
def all_finite(state: TrainState) -> jax.Array:
  """True iff every float in the state (parameters, statistics, optimizer moments) is
  finite; a scalar reduction on the device, so checking before each save costs no copy."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(state)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
