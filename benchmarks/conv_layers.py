"""Single convolution layers, JAX (XLA) against PyTorch, forward and forward + backward.

  python -m benchmarks.conv_layers        # under a minute on 2 CPU cores

The step-level benchmark (`benchmarks.train_step`) says the JAX step reaches a lower share
of the matmul peak than PyTorch's; this says which layers cost it. Times a 3x3 convolution
(stride 1, padding 1, no bias) at the shapes of the trainable modules, forward alone and
forward + backward (gradients for the input and the kernel), median ms per call, and the
JAX/PyTorch ratio of each.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.conv_small_maps import median_ms

# (where the shape occurs, batch, input channels, output channels, map side)
SHAPES = (("small: decoder layer3", 16, 64, 64, 32),
          ("small: decoder layer2", 16, 128, 128, 16),
          ("small: decoder layer1", 16, 256, 256, 8),
          ("small: neck bottleneck", 16, 512, 512, 4),
          ("small: projector (both views)", 32, 64, 32, 32),
          ("paper: projector (both views)", 32, 256, 128, 64),
          ("paper: decoder layer2", 16, 256, 256, 32))


def jax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def torch_forward(layer: torch.nn.Conv2d, x: torch.Tensor) -> None:
  with torch.no_grad():
    layer(x)


def torch_backward(layer: torch.nn.Conv2d, x: torch.Tensor) -> None:
  torch.autograd.grad((layer(x) ** 2).sum(), [x, layer.weight])


def main():
  print(f"JAX {jax.__version__} ({jax.devices()[0].device_kind}), PyTorch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print("| layer | shape | JAX fwd ms | PyTorch fwd ms | ratio | JAX fwd+bwd ms | "
        "PyTorch fwd+bwd ms | ratio |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for where, batch, cin, cout, side in SHAPES:
    x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, cin, cout)) * 0.02).astype(np.float32)
    xj, kj = jnp.asarray(x), jnp.asarray(kernel)
    forward = jax.jit(jax_conv)
    backward = jax.jit(jax.grad(lambda x, k: jnp.sum(jax_conv(x, k) ** 2), argnums=(0, 1)))
    layer = torch.nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
    with torch.no_grad():
      layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    times = [median_ms(forward, xj, kj, repeats=3),
             median_ms(torch_forward, layer, xt, repeats=3),
             median_ms(backward, xj, kj, repeats=3),
             median_ms(torch_backward, layer, xt, repeats=3)]
    print(f"| {where} | {batch}x{side}x{side}, {cin}->{cout} | {times[0]:.1f} | {times[1]:.1f} "
          f"| {times[0] / times[1]:.2f} | {times[2]:.1f} | {times[3]:.1f} | "
          f"{times[2] / times[3]:.2f} |", flush=True)


if __name__ == "__main__":
  main()
