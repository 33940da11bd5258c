"""ccl_jax.models.conv's matmul lowerings compute the same function as XLA's convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccl_jax.models import conv as conv_lib
from ccl_jax.models.resnet import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, kernel, stride):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=NHWC)


@pytest.mark.parametrize("kernel_size,stride,height,width", [
    (3, 1, 8, 8), (3, 1, 5, 7), (3, 2, 8, 8), (3, 2, 7, 9), (5, 2, 9, 8)])
def test_band_weight_gradient_equals_xla(kernel_size, stride, height, width):
  rng = np.random.default_rng(kernel_size * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, height, width, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 4)), jnp.float32)
  output, pullback = jax.vjp(lambda k: lax_conv(x, k, stride), kernel)
  output_grad = jnp.asarray(rng.normal(size=output.shape), jnp.float32)
  np.testing.assert_allclose(
      conv_lib.weight_gradient(x, output_grad, kernel_size, stride), pullback(output_grad)[0],
      rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_conv_values_and_gradients_equal_xla(monkeypatch, kernel_size, stride):
  """Through the public drop-in, with the size threshold lowered so that the test's 3x3
  shapes take the band path as the paper setting's do."""
  monkeypatch.setattr(conv_lib, "BAND_MIN_FLOPS", 0)
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 4, 3)), jnp.float32)
  pad = kernel_size // 2
  expected = "band" if kernel_size == 3 else "matmul"
  assert conv_lib.lowering(x.shape, kernel.shape, (stride, stride), [(pad, pad)] * 2,
                           dimension_numbers=NHWC) == expected
  ours = lambda x, k: conv_lib.conv_general_dilated(x, k, (stride, stride), [(pad, pad)] * 2,
                                                    dimension_numbers=NHWC)
  reference = lambda x, k: lax_conv(x, k, stride)
  target = jnp.asarray(rng.normal(size=reference(x, kernel).shape), jnp.float32)
  loss = lambda fn, x, k: jnp.sum(jnp.tanh(fn(x, k)) * target)
  np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-6, atol=1e-6)
  got = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(ours, x, kernel)
  want = jax.grad(loss, argnums=(1, 2))(reference, x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_flax_conv_layer_routes_through_band_weight_gradient(monkeypatch):
  """The model's `conv` factory hands flax the drop-in, and flax's call reaches the band."""
  calls = []
  monkeypatch.setattr(conv_lib, "BAND_MIN_FLOPS", 0)
  original = conv_lib.weight_gradient
  monkeypatch.setattr(conv_lib, "weight_gradient",
                      lambda *args, **kwargs: calls.append(args[2:4]) or original(*args, **kwargs))
  layer = conv(4, 3, 1, name="c", dtype=jnp.float32, use_bias=True)
  x = jnp.ones((2, 6, 6, 3))
  variables = layer.init(jax.random.key(0), x)
  jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))(variables)
  assert calls == [(3, 1)]


@pytest.mark.parametrize("change,expected", [
    ({}, "band"),
    ({"backend": "gpu"}, "xla"),
    ({"rhs_dilation": (2, 2)}, "xla"),
    ({"feature_group_count": 2}, "xla"),
    ({"padding": "SAME"}, "xla"),
    ({"padding": [(0, 0), (0, 0)]}, "xla"),
    ({"window_strides": (3, 3)}, "xla"),
    ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, "xla"),
    ({"lhs_shape": (16, 8, 8, 256), "rhs_shape": (3, 3, 256, 256)}, "xla"),
    ({"lhs_shape": (16, 8, 8, 256), "rhs_shape": (1, 1, 256, 256),
      "padding": [(0, 0), (0, 0)]}, "matmul"),
    ({"rhs_shape": (1, 1, 256, 128)}, "xla"),
])
def test_matmul_lowering_only_where_it_is_the_same_sum_and_pays(change, expected):
  args = {"lhs_shape": (32, 64, 64, 256), "rhs_shape": (3, 3, 256, 128),
          "window_strides": (1, 1), "padding": [(1, 1), (1, 1)], "dimension_numbers": NHWC,
          "backend": "cpu"}
  args.update(change)
  assert conv_lib.lowering(**args) == expected
