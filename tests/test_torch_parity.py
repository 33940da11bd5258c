"""Parity of ccl_jax's training step with the PyTorch reference (benchmarks.torch_reference).

Both frameworks get identical weights (torch state dict -> ccl_jax.weights.convert), the same batch
and the same augmented view (`batch['image_aug']`), feature noise off and all other-class
negatives, for resnet18 and wide_resnet50_2 at 64 px, batch 4, 2 classes, with whole-map
(window None) and 3x3 local matching.

* Loss terms agree to 1e-4 relative in float32 (the production path) and in float64.
* Gradients are compared in float64 in both frameworks, 1e-3 relative per parameter tensor
  (||g_jax - g_torch|| / ||g_torch||, tensors mapped by name through ccl_jax.weights.convert). Why
  not float32: at 64 px the maps are tiny (the neck output is 2x2), so the gradient is a
  discontinuous function of the forward values at every ReLU kink, and a single decoder
  output whose pre-activation lies within float32 rounding of 0 moves whole gradient
  tensors by ~1%. Measured: float32 JAX vs float64 differed by 1.3e-2 through exactly one
  flipped ReLU at the decoder output. float64 removes the kinks' lottery and still checks
  every formula and every name, but only with bit-identical inputs: the two frameworks'
  float32 normalisations differ by an ulp (XLA multiplies by reciprocals), which alone moved
  wide_resnet50_2's float64 decoder gradients by 1.3e-2, so the PyTorch encoder reads
  ccl_jax's normalised views (`_use_jax_normalisation`). Then the float64 gradients of
  resnet18 and wide_resnet50_2 agree to ~3e-8.
* The projector's conv biases feed InstanceNorm, which removes any per-channel constant, so
  their true gradient is exactly 0; their computed values are rounding noise, which a
  relative error would only amplify. For them the test asserts instead that both frameworks'
  gradients are below 1e-9 of the global gradient norm.
* One full optimiser step (clip to 5.0, Adam with the two learning rates): the parameter
  updates agree to 1e-2 relative per tensor. Adam's first step is lr * g / (|g| + 1e-8),
  ~lr * sign(g): an element whose gradient is tiny moves by up to lr whatever its size, so
  per-element gradient differences far below the 1e-3 tensor-level gradient tolerance show
  up amplified in the update (measured 7e-4 to 9e-4 for resnet18 at gradient errors of
  4e-6, before the inputs were made identical; 3e-8 since); 1e-2 still fails for any wrong
  learning rate, beta, clip or group assignment (those change whole tensors' updates by
  >= 2x or flip their signs). The zero-gradient biases must not move (|update| < 1e-6 lr).
  BatchNorm running means agree to 1e-5; running variances agree after undoing Bessel's
  correction, which PyTorch applies to the running variance and Flax does not (see
  `_expected_flax_var`).

The `:authors` preset (configs/mvtec_ad.py:authors: tau 0.05, one random local negative,
whole-map matching, the authors' global loss on the original view, the neck on both views,
feature noise) is compared with the reference's mode='authors' the same way: float32 loss
terms to 1e-4 relative, float64 gradients to 1e-3 relative per tensor. The reference draws
its randomness with torch's RNG (noise on/off, noise values and positions, one negative per
anchor and scale); the test replaces those torch functions with ones returning the draws
ccl_jax's step makes, so both compute on the same draws (the noise switched on).

Runtime: the default selection (resnet18: float32 losses, float64 window-3 step, float32
`:authors` losses) takes about 150 s on 2 CPU cores, almost all XLA compilation. The
whole-map resnet18 case, the `:authors` float64 gradients and every wide_resnet50_2 case are
marked slow (`pytest -m slow tests/test_torch_parity.py`).
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_reference import (build_trainer, jax_gradients, jax_params_tree,  # noqa: E402
                                        jax_variables)
from ccl_jax.ccl import step
from ccl_jax.models import frozen
from ccl_jax.models import (ResNetEncoder, ReverseDistillation, encoder_spec,  # noqa: E402
                            input_normalisation)
from ccl_jax.config import settings
from ccl_jax.config.settings import LossSettings, OptimizerSettings  # noqa: E402
from configs import mvtec_ad  # noqa: E402

IMAGE_SIZE = 64
CLASS_IDS = np.array([0, 1, 0, 1])
MOMENTUM = 0.1  # PyTorch's BatchNorm momentum (Flax's 0.9)


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (len(CLASS_IDS), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  augmented = rng.random((len(CLASS_IDS), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
  return images, augmented


def _torch_inputs(images, augmented, dtype):
  # uint8 / 255 in float32 like ccl_jax.ccl.step.gradients, up to an ulp (XLA multiplies by the
  # reciprocal; see `_use_jax_normalisation` for the comparisons that need exact inputs).
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x_aug = torch.from_numpy(augmented).permute(0, 3, 1, 2).contiguous()
  return x.to(dtype), x_aug.to(dtype), torch.from_numpy(CLASS_IDS).long()


def _flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v, np.float64)
          for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _relative(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _use_jax_normalisation(model, encoder_name, images, augmented, torch_inputs):
  """Makes the PyTorch model's encoder read ccl_jax's normalised views, bit for bit.

  Both frameworks normalise in float32, but XLA turns x / 255 and (x - mean) / std into
  multiplications by float32 reciprocals (fused into one loop), so ~half of ccl_jax's inputs
  differ from PyTorch's true divisions by an ulp (up to 7e-7). In float64 that is no longer
  rounding noise: the gradient at 64 px has ReLU kinks within ~1e-7 of the weights (central
  differences with h = 1e-5 and 1e-7 already disagree), and the 1-ulp input differences
  moved wide_resnet50_2's and resnet50's decoder gradients by 1-2% while both frameworks
  matched their own finite differences. With identical inputs they agree to ~3e-8. The
  views are the ones `step.gradients` builds (originals / 255 stacked on the augmented
  view), normalised by the same jitted `frozen.normalize`.
  """
  mean, std = input_normalisation(ResNetEncoder(encoder_spec(encoder_name)))
  views = jax.jit(lambda im, aug: frozen.normalize(
      jnp.concatenate([im.astype(jnp.float32) / 255.0, aug.astype(jnp.float32)]), mean, std))(
          jnp.asarray(images), jnp.asarray(augmented))
  normalised = torch.from_numpy(np.array(views)).permute(0, 3, 1, 2).contiguous()
  batch = len(images)
  # The minimal step encodes both views stacked, the authors' step one view per call.
  known = ((torch.cat(torch_inputs[:2]), normalised), (torch_inputs[0], normalised[:batch]),
           (torch_inputs[1], normalised[batch:]))

  def normalise(images01):
    for views01, views_normalised in known:
      if views01.shape == images01.shape and torch.equal(images01, views01):
        return views_normalised
    raise AssertionError("unexpected encoder input")

  model.normalise = normalise


def _jax_gradients(trainer, encoder_name, window, images, augmented, dtype):
  """ccl_jax's jitted `step.gradients` on the trainer's weights, computed in `dtype`."""
  spec = encoder_spec(encoder_name)
  model = ReverseDistillation(spec, use_projector=True, neck_width_per_group=64,
                              decoder_width_per_group=spec.width_per_group, dtype=dtype)
  encoder = ResNetEncoder(spec, dtype=dtype)
  encoder_variables, variables = jax_variables(trainer)
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  tx = step.make_optimizer(OptimizerSettings(
      projector_learning_rate=1e-3, learning_rate=5e-3, b1=0.5, b2=0.999, clip_norm=5.0))
  state = step.TrainState.create(apply_fn=model.apply, params=cast(variables["params"]),
                                 batch_stats=cast(variables["batch_stats"]), tx=tx,
                                 rng=jax.random.key(0))
  settings = LossSettings(window=window, local_negatives="all", temperature=0.1)
  batch = {"image": jnp.asarray(images), "class_id": jnp.asarray(CLASS_IDS, jnp.int32),
           "image_aug": jnp.asarray(augmented)}
  grads, terms, batch_stats = jax.jit(functools.partial(
      step.gradients, encoder=encoder, settings=settings))(state, cast(encoder_variables), batch)
  return state, grads, terms, batch_stats


def _check_terms(torch_terms, jax_terms):
  for name in ("kd", "local", "global_", "total"):
    t, j = float(torch_terms[name].detach()), float(getattr(jax_terms, name))
    assert abs(j - t) <= 1e-4 * abs(t), (name, j, t)


def _bn_counts(model) -> dict[str, tuple[int, int]]:
  """Forward hooks: per BatchNorm of the neck and decoder, (elements per channel, updates)."""
  counts: dict[str, tuple[int, int]] = {}
  for prefix in ("mff_oce", "net_s"):
    for name, module in getattr(model, prefix).named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        def hook(_, inputs, __, key=f"{prefix}.{name}"):
          n = inputs[0].numel() // inputs[0].shape[1]
          counts[key] = (n, counts.get(key, (n, 0))[1] + 1)
        module.register_forward_hook(hook)
  return counts


def _expected_flax_var(torch_var, n, updates):
  """Flax's running variance from PyTorch's, both starting at 1.

  Each PyTorch update blends in the unbiased batch variance (x n/(n-1)), Flax's the biased
  one; with the same n for every update the part added since the start scales uniformly.
  """
  decay = (1 - MOMENTUM) ** updates
  return decay + (torch_var - decay) * (n - 1) / n


_WIDE = pytest.param("wide_resnet50_2", marks=pytest.mark.slow)  # ~70 s of XLA compile each


@pytest.mark.parametrize("encoder_name", ["resnet18", _WIDE])
def test_float32_losses_match(encoder_name):
  images, augmented = _batch()
  trainer = build_trainer(encoder_name, image_size=IMAGE_SIZE, window=3)
  with torch.no_grad():
    torch_terms = trainer.loss_terms(*_torch_inputs(images, augmented, torch.float32))
  _, _, jax_terms, _ = _jax_gradients(trainer, encoder_name, 3, images, augmented,
                                      jnp.float32)
  _check_terms(torch_terms, jax_terms)
  assert float(jax_terms.local) > 0 and float(jax_terms.global_) > 0


@pytest.mark.parametrize("encoder_name", ["resnet18", _WIDE])
@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 3])
def test_gradients_and_one_step_match(encoder_name, window):
  images, augmented = _batch()
  trainer = build_trainer(encoder_name, image_size=IMAGE_SIZE, window=window)
  with jax.enable_x64(True):
    state, grads, jax_terms, jax_batch_stats = _jax_gradients(
        trainer, encoder_name, window, images, augmented, jnp.float64)
    new_state = state.apply_gradients(grads=grads, batch_stats=jax_batch_stats)
    jax_grads = _flat(grads)
    jax_update = _flat(jax.tree.map(lambda a, b: a - b, new_state.params, state.params))
    jax_stats = _flat(jax_batch_stats)

  model = trainer.model.double()
  counts = _bn_counts(model)
  inputs = _torch_inputs(images, augmented, torch.float64)
  _use_jax_normalisation(model, encoder_name, images, augmented, inputs)
  before = {k: p.detach().clone() for k, p in model.named_parameters()}
  buffers = {k: b.clone() for k, b in model.named_buffers()}
  torch_terms = trainer.loss_terms(*inputs)
  _check_terms(torch_terms, jax_terms)
  model.zero_grad()
  torch_terms["total"].backward()
  torch_grads = _flat(jax_gradients(model))
  # train_step recomputes the same gradients from the same state: undo this forward's
  # BatchNorm statistics updates so that the step starts where the JAX one did.
  with torch.no_grad():
    for k, b in model.named_buffers():
      b.copy_(buffers[k])
  counts.clear()
  trainer.train_step(*inputs)
  torch_update = _flat(jax_params_tree(model, {
      k: (p.detach() - before[k]).numpy() for k, p in model.named_parameters()
      if not k.startswith("net_t.")}))

  assert set(jax_grads) == set(torch_grads)
  global_norm = np.sqrt(sum(np.sum(g ** 2) for g in torch_grads.values()))
  worst_gradient = worst_update = 0.0
  for name, g in torch_grads.items():
    lr = 1e-3 if name.startswith("projector/") else 5e-3
    if name.startswith("projector/") and name.endswith("/bias"):  # conv -> InstanceNorm
      assert np.linalg.norm(g) < 1e-9 * global_norm, name
      assert np.linalg.norm(jax_grads[name]) < 1e-9 * global_norm, name
      assert np.abs(jax_update[name]).max() < 1e-6 * lr, name
      assert np.abs(torch_update[name]).max() < 1e-6 * lr, name
      continue
    worst_gradient = max(worst_gradient, _relative(jax_grads[name], g))
    worst_update = max(worst_update, _relative(jax_update[name], torch_update[name]))
    assert _relative(jax_grads[name], g) < 1e-3, (name, _relative(jax_grads[name], g))
    assert _relative(jax_update[name], torch_update[name]) < 1e-2, name
  print(f"{encoder_name} window={window}: max relative gradient error {worst_gradient:.1e}, "
        f"update error {worst_update:.1e}")

  _, torch_variables = jax_variables(trainer)
  torch_stats = _flat(torch_variables["batch_stats"])
  assert set(jax_stats) == set(torch_stats)
  for name, value in torch_stats.items():
    module = name.rsplit("/", 1)[0]
    torch_name = ("mff_oce." + module[len("neck/"):] if module.startswith("neck/")
                  else "net_s." + module[len("decoder/"):]).replace("/", ".")
    if name.endswith("/mean"):
      assert np.abs(jax_stats[name] - value).max() < 1e-5 * max(1.0, np.abs(value).max()), name
    else:
      n, updates = counts[torch_name]
      expected = _expected_flax_var(value, n, updates)
      assert np.abs(jax_stats[name] - expected).max() < 1e-5 * np.abs(expected).max(), name


# ---------------------------------------------------------------- the `:authors` preset
# The preset's loss and model settings against the reference's mode='authors' (the authors'
# code as it runs). Their random draws (noise on/off, noise values and positions, the one
# random negative per anchor and scale) are made ccl_jax's: the torch functions the
# reference draws them with are replaced by ones returning ccl_jax's draws.


def _authors_setup(dtype, seed_search=range(32)):
  """ccl_jax under configs/mvtec_ad.py:authors on the reference's weights: the state, its
  model, and the step's random draws; the state's key is chosen so the noise is on."""
  run_settings = settings.from_config(mvtec_ad.get_config("authors"))
  spec = encoder_spec("resnet18")
  trainer = build_trainer("resnet18", image_size=IMAGE_SIZE, mode="authors",
                          temperature=run_settings.loss.temperature)
  model = ReverseDistillation(spec, use_projector=True, neck_width_per_group=64,
                              decoder_width_per_group=spec.width_per_group,
                              noise_probability=run_settings.model.feature_noise_probability,
                              dtype=dtype)
  clean_model = model.clone(noise_probability=0.0)
  encoder = ResNetEncoder(spec, dtype=dtype)
  encoder_variables, variables = jax_variables(trainer)
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  encoder_variables, variables = cast(encoder_variables), cast(variables)
  images, augmented = _batch()
  both = encoder.apply(encoder_variables, frozen.normalize(jnp.concatenate(
      [jnp.asarray(images, jnp.float32) / 255.0, jnp.asarray(augmented)]),
      *input_normalisation(encoder)).astype(dtype))
  features = tuple(f[:len(images)] for f in both)
  features_aug = tuple(f[len(images):] for f in both)
  for seed in seed_search:
    rng = jax.random.key(seed)
    # What step.gradients draws at step 0: the noise key and the negatives' key per scale.
    _, noise_key, negative_key = jax.random.split(jax.random.fold_in(rng, 0), 3)
    run = lambda m: m.apply(variables, features, features_aug, True,
                            method="training_outputs", mutable=["batch_stats"],
                            rngs={"noise": noise_key})[0].projected
    noise = [np.asarray(a - b) for a, b in zip(run(model), run(clean_model))]
    if any(np.any(n != 0) for n in noise):
      break
  else:
    raise AssertionError("no seed switched the noise on")
  other = CLASS_IDS[:, None] != CLASS_IDS[None, :]
  chosen = [np.asarray(jnp.argmax(jnp.where(jnp.asarray(other), jax.random.uniform(k, other.shape),
                                            -1.0), axis=1))
            for k in jax.random.split(negative_key, len(features))]
  tx = step.make_optimizer(run_settings.optimizer)
  state = step.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                 batch_stats=variables["batch_stats"], tx=tx, rng=rng)
  return run_settings, trainer, encoder, encoder_variables, state, noise, chosen


def _script_torch_draws(monkeypatch, noise, chosen):
  """torch.randn(1) > 0.5 (noise on), randint masks of ones, randn_like the noise ccl_jax
  added (mask included), and randint(0, n, (1,)) the position of ccl_jax's negative among
  the anchor's other-class candidates, in the order the reference draws them."""
  noise_values = iter(torch.from_numpy(n).permute(0, 3, 1, 2) for n in noise)
  negatives = iter([int(np.flatnonzero(CLASS_IDS != CLASS_IDS[i]).tolist().index(c[i]))
                    for c in chosen for i in range(len(CLASS_IDS))])
  monkeypatch.setattr(torch, "randn", lambda *shape, **kw: torch.ones(1))
  monkeypatch.setattr(torch, "randn_like", lambda f: next(noise_values).to(f.dtype))

  def randint(low, high, size, **kw):
    if len(size) == 4:  # the noise positions: ccl_jax's positions are inside the noise
      return torch.ones(size, dtype=torch.long)
    return torch.tensor([next(negatives)])
  monkeypatch.setattr(torch, "randint", randint)
  return lambda: (next(noise_values, None) is None and next(negatives, None) is None)


def _authors_jax_terms(run_settings, encoder, encoder_variables, state, dtype):
  images, augmented = _batch()
  batch = {"image": jnp.asarray(images), "class_id": jnp.asarray(CLASS_IDS, jnp.int32),
           "image_aug": jnp.asarray(augmented, dtype)}
  return jax.jit(functools.partial(step.gradients, encoder=encoder,
                                   settings=run_settings.loss))(state, encoder_variables, batch)


def test_authors_preset_float32_losses_match_the_authors_code(monkeypatch):
  run_settings, trainer, encoder, encoder_variables, state, noise, chosen = _authors_setup(
      jnp.float32)
  assert run_settings.loss.local_negatives == "one_random" and run_settings.loss.window is None
  assert run_settings.loss.global_form == "authors" and run_settings.loss.temperature == 0.05
  _, jax_terms, _ = _authors_jax_terms(run_settings, encoder, encoder_variables, state,
                                       jnp.float32)
  all_drawn = _script_torch_draws(monkeypatch, noise, chosen)
  images, augmented = _batch()
  with torch.no_grad():
    torch_terms = trainer.loss_terms(*_torch_inputs(images, augmented, torch.float32))
  assert all_drawn()
  _check_terms(torch_terms, jax_terms)
  # The authors' global form differs from SupCon on these embeddings, and the noise is on.
  assert float(jax_terms.global_) > 0 and float(jax_terms.local) > 0


@pytest.mark.slow
def test_authors_preset_float64_gradients_match_the_authors_code(monkeypatch):
  with jax.enable_x64(True):
    run_settings, trainer, encoder, encoder_variables, state, noise, chosen = _authors_setup(
        jnp.float64)
    grads, jax_terms, _ = _authors_jax_terms(run_settings, encoder, encoder_variables, state,
                                             jnp.float64)
    jax_grads = _flat(grads)
  all_drawn = _script_torch_draws(monkeypatch, noise, chosen)
  images, augmented = _batch()
  model = trainer.model.double()
  inputs = _torch_inputs(images, augmented, torch.float64)
  _use_jax_normalisation(model, "resnet18", images, augmented, inputs)
  torch_terms = trainer.loss_terms(*inputs)
  _check_terms(torch_terms, jax_terms)
  model.zero_grad()
  torch_terms["total"].backward()
  assert all_drawn()
  torch_grads = _flat(jax_gradients(model))
  assert set(jax_grads) == set(torch_grads)
  global_norm = np.sqrt(sum(np.sum(g ** 2) for g in torch_grads.values()))
  for name, g in torch_grads.items():
    if name.startswith("projector/") and name.endswith("/bias"):  # conv -> InstanceNorm
      assert np.linalg.norm(jax_grads[name]) < 1e-9 * global_norm, name
      continue
    assert _relative(jax_grads[name], g) < 1e-3, (name, _relative(jax_grads[name], g))
