"""Every trained anomaly model behind one small interface: `Detector`.

  detector = detectors.load_detector(workdir)
  embeddings = detector.embed(images)          # [B, D] routing embeddings
  scores = detector.score(images, group_ids)   # Scores(anomaly_maps [B, S, S], image_scores [B])

`images` are uint8 RGB [B, S, S, 3] (S = `detector.image_size`), numpy or (sharded) jax
arrays; both methods are jitted and work on any batch size (each size compiles once).

* The routing embedding is the same for every detector: the frozen encoder's deepest
  feature map, averaged over space. Groups and routing (`ccl_jax.grouping`) use it.
* `ReverseDistillationDetector` (CCL, or RD when both contrastive weights are 0): the
  anomaly map of the encoder and decoder features (`ccl_jax.anomaly_maps`); one model for
  every class, so the group ids are not used.
* `HierCoreDetector`: nearest-neighbour distances to the coreset of each image's group
  (`ccl_jax.hiercore`).

Decisions, prediction, scenarios, evaluation and the confusion analysis use only this
interface. A detector is restored from a run directory without an optimizer.
"""
from __future__ import annotations

import abc
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax import anomaly_maps, hiercore, inference, losses, run_dir as run_dir_lib, weights
from ccl_jax.models import ReverseDistillation, build_encoder, encoder_spec
from ccl_jax.models.frozen import encode
from ccl_jax.settings import RunSettings


class Scores(NamedTuple):
  anomaly_maps: jax.Array  # [B, S, S] float32
  image_scores: jax.Array  # [B] float32, the maximum of each map


class Router:
  """The frozen encoder's routing embeddings; groups are fitted on them before any model
  exists (HierCore builds one coreset per group)."""

  def __init__(self, encoder: nn.Module, encoder_variables: Any):
    self.encoder = encoder
    self.encoder_variables = encoder_variables

  def embed(self, images: jax.Array) -> jax.Array:
    """Routing embeddings [B, D]: the frozen encoder's deepest map averaged over space."""
    return _jitted_routing_embedding(self.encoder)(self.encoder_variables, images)


class Detector(Router, abc.ABC):
  """A trained anomaly model: routing embeddings and anomaly scores of images."""

  checkpoint_step: int | None = None  # the training step it was restored from, if any

  def __init__(self, name: str, image_size: int, encoder: nn.Module, encoder_variables: Any):
    super().__init__(encoder, encoder_variables)
    self.name = name  # 'ccl' | 'rd' | 'hiercore'
    self.image_size = image_size

  def embed(self, images: jax.Array) -> jax.Array:
    self._check_images(images)
    return super().embed(images)

  def score(self, images: jax.Array, group_ids: jax.Array) -> Scores:
    """Anomaly maps and image scores of uint8 images [B, S, S, 3] in groups `group_ids`
    [B] (ignored by CCL / RD: one model for every class)."""
    self._check_images(images)
    if tuple(group_ids.shape) != (images.shape[0],):
      raise ValueError(f"group_ids must be [{images.shape[0]}], got shape "
                       f"{tuple(group_ids.shape)}.")
    return self._score(images, group_ids)

  @abc.abstractmethod
  def _score(self, images: jax.Array, group_ids: jax.Array) -> Scores:
    """`score` on checked inputs."""

  @abc.abstractmethod
  def _weights(self) -> dict[str, Any]:
    """Every array the model computes with, {'encoder': ..., ...}."""

  @abc.abstractmethod
  def _pure_score(self, arrays: dict[str, Any], images: jax.Array,
                  group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(anomaly maps, image scores) from `_weights()`-shaped arrays; traceable."""

  def pure_functions(self) -> tuple[list[np.ndarray], Callable, Callable]:
    """(weights, embed, score) for serialising the model (`ccl_jax.export`): the weights as
    a flat list of host arrays, and pure functions of it that compute what `embed` and
    `score` do, embed(weights, images) -> [B, D] and score(weights, images, group_ids) ->
    (anomaly maps [B, S, S], image scores [B]). A flat list, so the serialised functions
    take only arrays, never this package's pytree types."""
    leaves, treedef = jax.tree_util.tree_flatten(self._weights())

    def embed(arrays: list[jax.Array], images: jax.Array) -> jax.Array:
      encoder_variables = jax.tree_util.tree_unflatten(treedef, arrays)["encoder"]
      return routing_embedding(encoder_variables, images, encoder=self.encoder)

    def score(arrays: list[jax.Array], images: jax.Array,
              group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
      return self._pure_score(jax.tree_util.tree_unflatten(treedef, arrays), images,
                              group_ids)

    return [np.asarray(leaf) for leaf in leaves], embed, score

  def _check_images(self, images: jax.Array) -> None:
    shape = (self.image_size, self.image_size, 3)
    if images.dtype != jnp.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
      raise ValueError(f"{self.name} detector: expected uint8 images [B, {self.image_size}, "
                       f"{self.image_size}, 3], got {images.dtype} {tuple(images.shape)}.")


class ReverseDistillationDetector(Detector):
  """CCL / RD: the anomaly map of the frozen encoder's features against the decoder's,
  times `map_scale` (`model.anomaly_map_scale`)."""

  def __init__(self, name: str, image_size: int, encoder: nn.Module, encoder_variables: Any,
               network: ReverseDistillation, variables: Any, *, map_scale: float = 1.0):
    super().__init__(name, image_size, encoder, encoder_variables)
    self.network = network
    self.variables = variables
    self.map_scale = map_scale

  def outputs(self, images: jax.Array) -> dict[str, jax.Array]:
    """{'anomaly_map', 'score', 'kd'}: maps, image scores and each image's KD loss (the RD
    objective in inference mode, the validation loss)."""
    return _jitted_rd_outputs(self.network, self.encoder, self.map_scale)(self.variables,
                                                          self.encoder_variables, images)

  def _score(self, images: jax.Array, group_ids: jax.Array) -> Scores:
    del group_ids  # one model for every class
    outputs = self.outputs(images)
    return Scores(outputs["anomaly_map"], outputs["score"])

  def _weights(self) -> dict[str, Any]:
    return {"encoder": self.encoder_variables, "network": self.variables}

  def _pure_score(self, arrays, images, group_ids):
    del group_ids  # one model for every class
    outputs = rd_outputs(arrays["network"], arrays["encoder"], images,
                         network=self.network, encoder=self.encoder, map_scale=self.map_scale)
    return outputs["anomaly_map"], outputs["score"]

  def global_embedding(self, images: jax.Array) -> jax.Array:
    """The neck's global embedding [B, D] (the paper's global contrastive loss input)."""
    return _jitted_global_embedding(self.network, self.encoder)(self.variables,
                                                                self.encoder_variables, images)


class HierCoreDetector(Detector):
  """HierCore: patch distances to the coreset of each image's group."""

  def __init__(self, image_size: int, encoder: nn.Module, encoder_variables: Any,
               bank: hiercore.MemoryBank, feature_dim: int | None,
               reweight_neighbours: int = 0):
    super().__init__("hiercore", image_size, encoder, encoder_variables)
    self.bank = bank
    self.feature_dim = feature_dim
    self.reweight_neighbours = reweight_neighbours

  def _score(self, images: jax.Array, group_ids: jax.Array,
             excluded: hiercore.Excluded | None = None) -> Scores:
    outputs = _jitted_hiercore_scores(self.encoder, self.feature_dim, self.reweight_neighbours)(
        self.bank, self.encoder_variables, images, group_ids, excluded=excluded)
    return Scores(outputs["anomaly_map"], outputs["score"])

  def _weights(self) -> dict[str, Any]:
    return {"encoder": self.encoder_variables, "bank": self.bank}

  def score_leaving_out(self, images: jax.Array, group_ids: jax.Array,
                        excluded: hiercore.Excluded) -> Scores:
    """`score` against the bank without the points `excluded` names per image (a training
    image's own patches: its leave-one-out score)."""
    self._check_images(images)
    return self._score(images, group_ids, excluded)

  def _pure_score(self, arrays, images, group_ids):
    outputs = hiercore.score_images(arrays["bank"], arrays["encoder"], images, group_ids,
                                    encoder=self.encoder, feature_dim=self.feature_dim,
                                    reweight_neighbours=self.reweight_neighbours)
    return outputs["anomaly_map"], outputs["score"]


def rd_outputs(variables, encoder_variables, images: jax.Array, *,
               network: ReverseDistillation, encoder: nn.Module,
               map_scale: float = 1.0) -> dict[str, jax.Array]:
  """Inference on uint8 images [B,H,W,3]: anomaly maps (times `map_scale`), image scores and
  per-image KD loss."""
  features = encode(encoder, encoder_variables, images)
  reconstruction = network.apply(variables, features, train=False)
  maps = map_scale * anomaly_maps.anomaly_map(features, reconstruction, images.shape[1:3])
  return {"anomaly_map": maps, "score": anomaly_maps.image_score(maps),
          "kd": losses.kd_loss(features, reconstruction, per_sample=True)}


def routing_embedding(encoder_variables, images: jax.Array, *, encoder: nn.Module) -> jax.Array:
  """Spatial mean of the frozen encoder's deepest feature map, [B, D]."""
  features = encode(encoder, encoder_variables, images)
  return jnp.mean(features[-1], axis=(1, 2))


# One jitted function per network/encoder, so every pass over a split (training, hold-out,
# test) and every detector of the same architecture share one compilation.
@functools.lru_cache(maxsize=8)
def _jitted_rd_outputs(network: ReverseDistillation, encoder: nn.Module, map_scale: float):
  return jax.jit(functools.partial(rd_outputs, network=network, encoder=encoder,
                                   map_scale=map_scale))


@functools.lru_cache(maxsize=8)
def _jitted_routing_embedding(encoder: nn.Module):
  return jax.jit(functools.partial(routing_embedding, encoder=encoder))


@functools.lru_cache(maxsize=8)
def _jitted_global_embedding(network: ReverseDistillation, encoder: nn.Module):
  def embed(variables, encoder_variables, images):
    features = encode(encoder, encoder_variables, images)
    return network.apply(variables, features, method="global_embedding")
  return jax.jit(embed)


@functools.lru_cache(maxsize=8)
def _jitted_hiercore_scores(encoder: nn.Module, feature_dim: int | None,
                            reweight_neighbours: int):
  return jax.jit(functools.partial(hiercore.score_images, encoder=encoder,
                                   feature_dim=feature_dim,
                                   reweight_neighbours=reweight_neighbours))


def build_network(run_settings: RunSettings) -> ReverseDistillation:
  """The projector + neck + decoder network the settings describe (not initialised)."""
  spec = encoder_spec(run_settings.model.encoder)
  model = run_settings.model
  return ReverseDistillation(
      spec, use_projector=run_settings.use_projector,
      neck_width_per_group=model.neck_width_per_group or spec.width_per_group,
      decoder_width_per_group=model.decoder_width_per_group or spec.width_per_group,
      noise_probability=model.feature_noise_probability, dtype=jnp.dtype(model.dtype))


def frozen_encoder(run_settings: RunSettings, sharding) -> tuple[nn.Module, Any]:
  """The frozen encoder module and its variables, placed with `sharding`."""
  encoder = build_encoder(run_settings.model.encoder, jnp.dtype(run_settings.model.dtype))
  variables = weights.encoder_variables(encoder, run_settings.model.encoder_weights,
                                        seed=run_settings.seed,
                                        image_size=run_settings.image_size)
  return encoder, jax.device_put(variables, sharding)


def network_template(network: ReverseDistillation, encoder: nn.Module, encoder_variables,
                     image_size: int) -> Any:
  """Shapes and dtypes of the network's variables, {'params', 'batch_stats'}."""
  features = jax.eval_shape(
      lambda v: encode(encoder, v, jnp.zeros((1, image_size, image_size, 3), jnp.uint8)),
      encoder_variables)
  return jax.eval_shape(network.init, jax.random.key(0), features)


def hiercore_detector(run_settings: RunSettings, bank: hiercore.MemoryBank, encoder: nn.Module,
                      encoder_variables: Any) -> HierCoreDetector:
  return HierCoreDetector(run_settings.image_size, encoder, encoder_variables,
                          jax.device_put(bank, inference.replicated_sharding()),
                          run_settings.hiercore.feature_dim or None,
                          run_settings.hiercore.reweight_neighbours)


def load_detector(path: str, *, checkpoint: str = "best") -> Detector:
  """The detector of a run directory: a CCL/RD run's `checkpoint` ('best' or 'latest'),
  or a HierCore run's memory bank. Reads only; builds no optimizer."""
  run = run_dir_lib.RunDir(path)
  run_settings = run.read_settings()
  replicated = inference.replicated_sharding()
  if run_settings.model.kind == "hiercore":
    bank = run.read_memory_bank()
    encoder, encoder_variables = frozen_encoder(run_settings, replicated)
    return hiercore_detector(run_settings, bank, encoder, encoder_variables)
  # Checked before the encoder is built: a missing checkpoint is the likelier mistake.
  if run.checkpoint_step(checkpoint) is None:
    raise FileNotFoundError(f"No checkpoint in {run.checkpoint_dir(checkpoint)}; expected "
                            "'best' or 'latest' of a training run.")
  encoder, encoder_variables = frozen_encoder(run_settings, replicated)
  network = build_network(run_settings)
  template = network_template(network, encoder, encoder_variables, run_settings.image_size)
  variables, restored_step = run.restore_model_variables(checkpoint, template, replicated)
  detector = ReverseDistillationDetector(run_settings.model_name, run_settings.image_size,
                                         encoder, encoder_variables, network, variables,
                                         map_scale=run_settings.model.anomaly_map_scale)
  detector.checkpoint_step = restored_step
  return detector
