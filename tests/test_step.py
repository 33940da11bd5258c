"""The training step: gradient flow, the RD baseline, and 8-device == 1-device."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax.ccl import step
from ccl_jax.models import anomaly_maps
from ccl_jax.models import ResNetEncoder, ReverseDistillation, encoder_spec
from ccl_jax.config.settings import LossSettings, OptimizerSettings
from ccl_jax.ccl.detector import rd_outputs

SIZE = 32


def _setup(settings, use_projector=True, noise=0.0):
  spec = encoder_spec("resnet18")
  encoder = ResNetEncoder(spec)
  model = ReverseDistillation(spec, use_projector=use_projector, noise_probability=noise)
  encoder_variables = encoder.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  tx = step.make_optimizer(OptimizerSettings(projector_learning_rate=1e-3, learning_rate=5e-3,
                                             b1=0.5, b2=0.999, clip_norm=5.0))
  state = step.create_train_state(model, encoder, encoder_variables, tx, SIZE,
                                  jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, SIZE, SIZE, 3)), jnp.uint8),
           "class_id": jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3], jnp.int32)}
  return encoder, model, encoder_variables, state, batch


def _changed(before, after):
  return jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                before, after)


def test_every_trainable_module_learns_and_the_encoder_does_not():
  settings = LossSettings(window=3)
  encoder, _, encoder_variables, state, batch = _setup(settings, noise=1.0)
  before = jax.device_get(state.params)
  encoder_before = jax.device_get(encoder_variables)
  new_state, metrics = step.train_step(state, encoder_variables, batch, encoder=encoder,
                                       settings=settings)
  changed = _changed(before, jax.device_get(new_state.params))
  for module in ("projector", "neck", "decoder"):
    leaves = jax.tree_util.tree_leaves(changed[module])
    assert all(leaves), f"some {module} parameters received no update"
  assert not any(jax.tree_util.tree_leaves(_changed(encoder_before, encoder_variables)))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["local"]) > 0 and float(metrics["global"]) > 0

  # The encoder gets no gradient even when differentiated directly.
  def loss_wrt_encoder(enc_vars):
    _, m = step.train_step(state, enc_vars, batch, encoder=encoder, settings=settings)
    return m["loss"]
  grads = jax.grad(loss_wrt_encoder)(encoder_variables)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_rd_baseline_has_no_contrastive_terms_and_skips_the_augmented_view():
  settings = LossSettings(local_weight=0.0, global_weight=0.0)
  encoder, _, encoder_variables, state, batch = _setup(settings, use_projector=False)
  assert "projector" not in state.params
  new_state, metrics = step.train_step(state, encoder_variables, batch, encoder=encoder,
                                       settings=settings)
  assert float(metrics["local"]) == 0.0 and float(metrics["global"]) == 0.0
  assert float(metrics["loss"]) == pytest.approx(float(metrics["kd"]))
  jaxpr = str(jax.make_jaxpr(lambda s, e, b: step.train_step(
      s, e, b, encoder=encoder, settings=settings))(state, encoder_variables, batch))
  ccl_jaxpr = str(jax.make_jaxpr(lambda s, e, b: step.train_step(
      s, e, b, encoder=encoder, settings=LossSettings()))(state, encoder_variables, batch))
  # The augmented view is only computed when a contrastive term needs it.
  assert "augment_batch" in ccl_jaxpr and "augment_batch" not in jaxpr


def test_neck_on_the_augmented_view_moves_only_the_batchnorm_statistics():
  # The step runs the neck on the augmented view when the global loss reads it, or when
  # loss.neck_on_augmented_view asks for it although nothing reads it (the authors' code).
  original = LossSettings(global_views="original", global_form="authors")
  switched = LossSettings(global_views="original", global_form="authors",
                          neck_on_augmented_view=True)
  assert not original.embeds_augmented_view and switched.embeds_augmented_view
  assert LossSettings(global_views="both").embeds_augmented_view
  assert not LossSettings(local_weight=0.0, global_weight=0.0,
                          neck_on_augmented_view=True).embeds_augmented_view

  encoder, model, encoder_variables, state, batch = _setup(original)
  images = batch["image"][:4].astype(jnp.float32) / 255.0
  features = encoder.apply(encoder_variables, images)
  features_aug = encoder.apply(encoder_variables, images[:, ::-1])
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def forward(embed_augmented):
    outputs, updates = model.apply(variables, features, features_aug, embed_augmented,
                                   method="training_outputs", mutable=["batch_stats"])
    return outputs, updates["batch_stats"]
  plain, stats = forward(False)
  both, stats_both = forward(True)
  # What the losses read is the same; the neck's running statistics also saw the
  # augmented view, the decoder's did not.
  for a, b in zip(jax.tree_util.tree_leaves((plain.projected, plain.embedding,
                                             plain.decoder_features)),
                  jax.tree_util.tree_leaves((both.projected, both.embedding,
                                             both.decoder_features))):
    np.testing.assert_array_equal(a, b)
  assert plain.embedding_aug is None and both.embedding_aug.shape == both.embedding.shape
  assert all(jax.tree_util.tree_leaves(_changed(stats["neck"], stats_both["neck"])))
  assert not any(jax.tree_util.tree_leaves(_changed(stats["decoder"], stats_both["decoder"])))


def test_predict_outputs():
  settings = LossSettings()
  encoder, model, encoder_variables, state, batch = _setup(settings)
  out = rd_outputs(step.variables_of(state), encoder_variables, batch["image"],
                            network=model, encoder=encoder)
  assert out["anomaly_map"].shape == (8, SIZE, SIZE)
  np.testing.assert_allclose(out["score"], np.max(np.asarray(out["anomaly_map"]), axis=(1, 2)))
  assert out["kd"].shape == (8,)
  # The authors' evaluator scale: maps and scores exactly 1/9, the KD loss untouched.
  scaled = rd_outputs(step.variables_of(state), encoder_variables, batch["image"],
                                network=model, encoder=encoder,
                                map_scale=anomaly_maps.AUTHORS_ANOMALY_MAP_SCALE)
  np.testing.assert_allclose(9 * np.asarray(scaled["anomaly_map"]), out["anomaly_map"],
                             rtol=1e-5)
  np.testing.assert_allclose(9 * np.asarray(scaled["score"]), out["score"], rtol=1e-5)
  np.testing.assert_array_equal(scaled["kd"], out["kd"])


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_num_cpu_devices', int(sys.argv[1]))
    jax.config.update('jax_enable_x64', True)
    import jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ccl_jax.ccl import step
    from ccl_jax.runtime import inference
    from ccl_jax.config.settings import LossSettings
    from ccl_jax.models import ResNetEncoder, ReverseDistillation, encoder_spec
    size = 32
    spec = encoder_spec('resnet18')
    encoder = ResNetEncoder(spec, dtype=jnp.float64)
    model = ReverseDistillation(spec, noise_probability=1.0, dtype=jnp.float64)
    mesh = inference.data_mesh()
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    enc_vars = jax.device_put(encoder.init(jax.random.key(0), jnp.zeros((1, size, size, 3))),
                              replicated)
    tx = optax.sgd(0.05)
    state = jax.jit(lambda e, k: step.create_train_state(model, encoder, e, tx, size, k),
                    out_shardings=replicated)(enc_vars, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (8, size, size, 3)).astype(np.uint8),
             'class_id': np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)}
    batch = {k: jax.device_put(v, sharded) for k, v in batch.items()}
    train_step = step.jit_train_step(encoder, LossSettings(window=3))
    state, metrics = train_step(state, enc_vars, batch)
    leaves = jax.tree_util.tree_leaves({'p': state.params, 's': state.batch_stats})
    assert all(l.sharding.is_fully_replicated for l in leaves)
    flat = np.concatenate([np.asarray(l).ravel() for l in leaves])
    np.save(sys.argv[2], flat)
    print(json.dumps({k: float(v) for k, v in metrics.items()}))
""")


def _run_devices(tmp_path, num_devices):
  path = tmp_path / f"params{num_devices}.npy"
  out = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(num_devices), str(path)],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), np.load(path)


def test_eight_devices_match_one_device(tmp_path):
  """One step of the same global batch on 8 simulated devices equals the 1-device step:
  losses, parameters and BatchNorm statistics within 1e-5.

  Computed in float64 and with SGD, so that the comparison measures the sharding and not
  float32 rounding: at initialisation the embeddings are nearly parallel, the
  temperature-scaled contrastive gradients cancel catastrophically, and float32 reduction
  order alone moves some gradient entries by 1e-3 relative; Adam's first step,
  g / (|g| + eps), then amplifies that for the parameters whose true gradient is ~0
  (conv biases cancelled by InstanceNorm). Adam itself is elementwise on replicated
  values, so it cannot make the layouts differ once the gradients agree.
  """
  metrics1, params1 = _run_devices(tmp_path, 1)
  metrics8, params8 = _run_devices(tmp_path, 8)
  for key in ("loss", "kd", "local", "global", "grad_norm"):
    assert metrics8[key] == pytest.approx(metrics1[key], rel=1e-5, abs=1e-6)
  np.testing.assert_allclose(params8, params1, rtol=1e-5, atol=1e-5)
