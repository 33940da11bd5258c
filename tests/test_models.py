"""Model shapes (RD4AD Sec. 3, CCL paper Fig. 2), torchvision-style names, and deconv semantics."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax.models import (ENCODERS, ResNetEncoder, ReverseDistillation, build_encoder,
                            encoder_spec)
from ccl_jax.models.resnet import Deconv2x2

EXPECTED = {  # channels of layer1..3 and of the bottleneck, for 256x256 inputs
    "resnet18": ((64, 128, 256), 512),
    "resnet34": ((64, 128, 256), 512),
    "resnet50": ((256, 512, 1024), 2048),
    "wide_resnet50_2": ((256, 512, 1024), 2048),
    "efficientnet_lite0": ((24, 40, 112), 224),  # decoder built from the stage channels
}


def _shapes(name, size=256):
  spec = encoder_spec(name)
  encoder = build_encoder(name)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  enc_vars = jax.eval_shape(encoder.init, jax.random.key(0), images)
  features = jax.eval_shape(encoder.apply, enc_vars, images)
  model = ReverseDistillation(spec, decoder_width_per_group=spec.width_per_group)
  variables = jax.eval_shape(model.init, jax.random.key(0), features)
  outputs, _ = jax.eval_shape(
      lambda v, f: model.apply(v, f, f, True, method="training_outputs",
                               mutable=["batch_stats"], rngs={"noise": jax.random.key(0)}),
      variables, features)
  return enc_vars, features, variables, outputs


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_shapes_match_reference(name):
  channels, bottleneck = EXPECTED[name]
  _, features, _, outputs = _shapes(name)
  want = [(2, 64, 64, channels[0]), (2, 32, 32, channels[1]), (2, 16, 16, channels[2])]
  assert [f.shape for f in features] == want
  assert [f.shape for f in outputs.decoder_features] == want
  assert [f.shape for f in outputs.projected] == want
  assert outputs.embedding.shape == (2, bottleneck)
  assert outputs.embedding_aug.shape == (2, bottleneck)


def test_wide_resnet50_2_parameter_names_mirror_torchvision():
  enc_vars, _, variables, _ = _shapes("wide_resnet50_2", size=64)
  names = {"/".join(k) for k in flax.traverse_util.flatten_dict(enc_vars["params"])}
  for key in ("conv1/kernel", "bn1/scale", "bn1/bias", "layer1/0/conv3/kernel",
              "layer1/0/downsample/0/kernel", "layer1/0/downsample/1/scale",
              "layer3/5/bn3/bias"):
    assert key in names, key
  assert not any(k.startswith("layer4") for k in names)
  stats = {"/".join(k) for k in flax.traverse_util.flatten_dict(enc_vars["batch_stats"])}
  assert {"bn1/mean", "bn1/var"} <= stats
  # torchvision's wide_resnet50_2 layer1.0.conv2 is 128 -> 128 (width_per_group 128).
  assert enc_vars["params"]["layer1"]["0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  rd = {"/".join(k) for k in flax.traverse_util.flatten_dict(variables["params"])}
  for key in ("projector/proj_a/0/kernel", "projector/proj_c/9/bias", "neck/conv1/kernel",
              "neck/bn_layer/0/downsample/0/kernel", "decoder/layer1/0/upsample/0/kernel",
              "decoder/layer3/2/conv3/kernel"):
    assert key in rd, key
  # The authors' CCL neck: width_per_group 64 -> bottleneck width 512 in bn_layer.0.conv1.
  assert variables["params"]["neck"]["bn_layer"]["0"]["conv1"]["kernel"].shape == (
      1, 1, 3072, 512)


def test_resnet18_has_no_layer1_downsample():
  enc_vars, *_ = _shapes("resnet18", size=64)
  assert "downsample" not in enc_vars["params"]["layer1"]["0"]
  assert "downsample" in enc_vars["params"]["layer2"]["0"]


def test_deconv_matches_pytorch_conv_transpose_semantics():
  """out[2i+a, 2j+b, o] = sum_c x[i, j, c] * W_torch[c, o, a, b] with kernel = W^T(2,3,1,0)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)
  w_torch = rng.normal(size=(5, 6, 2, 2)).astype(np.float32)  # [in, out, kh, kw]
  layer = Deconv2x2(6, jnp.float32, name="d")
  variables = {"params": {"kernel": jnp.asarray(w_torch.transpose(2, 3, 1, 0))}}
  got = np.asarray(layer.apply(variables, jnp.asarray(x)))
  want = np.zeros((1, 6, 8, 6), np.float32)
  for a in range(2):
    for b in range(2):
      want[:, a::2, b::2, :] = np.einsum("nijc,co->nijo", x, w_torch[:, :, a, b])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_deconv_values_and_gradients_equal_lax_conv_transpose():
  """The matmul form is the same function as flax's ConvTranspose (lax.conv_transpose)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(2, 2, 6, 4)), jnp.float32)
  layer = Deconv2x2(6, jnp.float32, name="d")
  target = jnp.asarray(rng.normal(size=(2, 6, 10, 6)), jnp.float32)

  def loss(layer_fn, k, inputs):
    return jnp.sum(layer_fn(k, inputs) * target)

  ours = lambda k, inputs: layer.apply({"params": {"kernel": k}}, inputs)
  reference = lambda k, inputs: jax.lax.conv_transpose(
      inputs, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      transpose_kernel=True)
  np.testing.assert_allclose(ours(kernel, x), reference(kernel, x), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss, argnums=(1, 2))(ours, kernel, x),
                       jax.grad(loss, argnums=(1, 2))(reference, kernel, x)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_encoder_and_bad_image_shape_are_clear_errors():
  with pytest.raises(ValueError, match="resnet18"):
    encoder_spec("resnet101")
  encoder = ResNetEncoder(encoder_spec("resnet18"))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    encoder.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_instance_norm_makes_projector_per_sample():
  """Stacking both views through the projector is exact: it has no cross-sample statistic."""
  spec = encoder_spec("resnet18")
  model = ReverseDistillation(spec)
  rng = np.random.default_rng(1)
  feats = tuple(jnp.asarray(rng.normal(size=(4, s, s, c)), jnp.float32)
                for s, c in ((8, 64), (4, 128), (2, 256)))
  variables = model.init(jax.random.key(0), feats)
  full = model.apply(variables, feats, method="project")
  half = model.apply(variables, tuple(f[:2] for f in feats), method="project")
  for a, b in zip(full, half):
    np.testing.assert_allclose(a[:2], b, rtol=1e-5, atol=1e-5)
