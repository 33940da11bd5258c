"""Single convolution layers, JAX (XLA) against PyTorch, forward and forward + backward.

  python -m benchmarks.conv_layers        # about 3 minutes on 2 CPU cores

The step-level benchmark (`benchmarks.train_step`) says the JAX step reaches a lower share
of the matmul peak than PyTorch's; this says which layers cost it. Times convolutions (no
bias, padding kernel // 2) at the shapes of the model, forward alone and forward + backward
(gradients for the input and the kernel), median ms per call. JAX is timed twice: as XLA
lowers `lax.conv_general_dilated` (`lax`) and as the model runs it (`ccl_jax.models.conv`,
whose `lowering` column says which form it takes at that shape).
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app

from benchmarks.conv_small_maps import median_ms
from ccl_jax.models import conv as conv_lib

# (where the shape occurs, batch, input channels, output channels, map side, kernel, stride)
SHAPES = (("small: decoder layer3", 16, 64, 64, 32, 3, 1),
          ("small: decoder layer2", 16, 128, 128, 16, 3, 1),
          ("small: decoder layer1", 16, 256, 256, 8, 3, 1),
          ("small: neck bottleneck", 16, 512, 512, 4, 3, 1),
          ("small: projector (both views)", 32, 64, 32, 32, 3, 1),
          ("paper: projector a (both views)", 32, 256, 128, 64, 3, 1),
          ("paper: projector a (both views)", 32, 128, 256, 64, 3, 1),
          ("paper: projector b (both views)", 32, 512, 256, 32, 3, 1),
          ("paper: decoder layer3", 16, 128, 128, 64, 3, 1),
          ("paper: decoder layer2", 16, 256, 256, 32, 3, 1),
          ("paper: decoder layer3 conv1", 16, 512, 128, 64, 1, 1),
          ("paper: decoder layer3 conv3", 16, 128, 256, 64, 1, 1),
          ("paper: encoder layer1 conv1", 16, 256, 128, 64, 1, 1),
          ("paper: neck conv1", 16, 256, 512, 64, 3, 2),
          ("paper: neck shortcut", 16, 3072, 2048, 16, 1, 2))


def same_conv(conv_general_dilated):
  """(x, kernel, stride) -> NHWC conv with padding kernel // 2, computed by the given lowering."""
  def conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    pad = kernel.shape[0] // 2
    return conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return conv


LOWERINGS = (same_conv(jax.lax.conv_general_dilated), same_conv(conv_lib.conv_general_dilated))


def jax_backward(conv, stride: int):
  loss = lambda x, kernel: jnp.sum(conv(x, kernel, stride) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def torch_forward(layer: torch.nn.Conv2d, x: torch.Tensor) -> None:
  with torch.no_grad():
    layer(x)


def torch_backward(layer: torch.nn.Conv2d, x: torch.Tensor) -> None:
  torch.autograd.grad((layer(x) ** 2).sum(), [x, layer.weight])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"JAX {jax.__version__} ({jax.devices()[0].device_kind}), PyTorch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print("| layer | shape | lowering | fwd ms: lax | ccl_jax | PyTorch | ratio | "
        "fwd+bwd ms: lax | ccl_jax | PyTorch | ratio |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for where, batch, cin, cout, side, k, stride in SHAPES:
    x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
    kernel = (rng.normal(size=(k, k, cin, cout)) * 0.02).astype(np.float32)
    xj, kj = jnp.asarray(x), jnp.asarray(kernel)
    pad = k // 2
    how = conv_lib.lowering(x.shape, kernel.shape, (stride, stride), ((pad, pad), (pad, pad)),
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    layer = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=False)
    with torch.no_grad():
      layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    forward = [median_ms(jax.jit(conv, static_argnums=2), xj, kj, stride, repeats=3)
               for conv in LOWERINGS]
    forward.append(median_ms(torch_forward, layer, xt, repeats=3))
    backward = [median_ms(jax_backward(conv, stride), xj, kj, repeats=3)
                for conv in LOWERINGS]
    backward.append(median_ms(torch_backward, layer, xt, repeats=3))
    cells = [f"{t:.1f}" for t in forward] + [f"{forward[1] / forward[2]:.2f}"]
    cells += [f"{t:.1f}" for t in backward] + [f"{backward[1] / backward[2]:.2f}"]
    print(f"| {where} | {batch}x{side}x{side}, {k}x{k}/{stride}, {cin}->{cout} | {how} | "
          + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
