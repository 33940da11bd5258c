"""Why ccl_jax writes RD's 2x2 transposed convolution as a matmul (`models.resnet.Deconv2x2`).

  python -m benchmarks.deconv            # about 3 min on 2 CPU cores

Times forward + backward (gradients for the input and the kernel) of the decoder's
upsampling layers, batch 16, at the shapes of the small setting (resnet18, 128 px) and the
paper setting (wide_resnet50_2, 256 px): `lax.conv_transpose` (what flax's ConvTranspose
runs) against `Deconv2x2` (einsum + depth-to-space). Both compute the same values (checked
here to 1e-4). Prints median ms per call and the speed-up.
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from benchmarks.conv_small_maps import median_ms
from ccl_jax.models.resnet import Deconv2x2

# (setting, input channels, output channels, input side): the decoder's upsampling layers.
SHAPES = (("small", 512, 256, 4), ("small", 256, 128, 8), ("small", 128, 64, 16),
          ("paper", 2048, 1024, 8), ("paper", 512, 512, 8), ("paper", 1024, 512, 16),
          ("paper", 512, 256, 32))
BATCH = 16


def conv_transpose(kernel: jax.Array, x: jax.Array) -> jax.Array:
  return jax.lax.conv_transpose(x, kernel, (2, 2), "VALID",
                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                transpose_kernel=True)


def matmul_form(kernel: jax.Array, x: jax.Array) -> jax.Array:
  return Deconv2x2(kernel.shape[2]).apply({"params": {"kernel": kernel}}, x)


def forward_backward(layer):
  return jax.jit(jax.grad(lambda k, x: jnp.sum(layer(k, x) ** 2), argnums=(0, 1)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"device: {jax.devices()[0].device_kind}; batch {BATCH}; forward + backward")
  print("| setting | layer | conv_transpose ms | matmul form ms | speed-up |")
  print("|---|---|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for setting, cin, cout, side in SHAPES:
    x = jnp.asarray(rng.normal(size=(BATCH, side, side, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 2, cout, cin)) * 0.02, jnp.float32)
    np.testing.assert_allclose(matmul_form(kernel, x), conv_transpose(kernel, x),
                               rtol=1e-4, atol=1e-4)
    slow = median_ms(forward_backward(conv_transpose), kernel, x, repeats=3)
    fast = median_ms(forward_backward(matmul_form), kernel, x, repeats=3)
    print(f"| {setting} | {cin}->{cout} @ {side}x{side} | {slow:.1f} | {fast:.1f} | "
          f"{slow / fast:.1f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
