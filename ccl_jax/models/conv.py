"""Convolutions written as matrix products where XLA:CPU's own lowering is slow.

XLA's CPU backend runs a 1x1 convolution up to 3x slower than the same matmul, and lowers the
weight gradient of any convolution to a direct convolution over the batch and spatial axes,
much slower than matmuls for RD's 1x1 convs and for 3x3 convs on large maps (forward +
backward 1.5x to 4x the matmul form's time, `python -m benchmarks.conv_layers`): at the
paper setting the projector's 64x64 convs alone spent seconds a step there.

`conv_general_dilated` below is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv`
takes it as `conv_general_dilated=`) that computes the same function. On the CPU backend
(`lowering` decides, per call, from static shapes):
  - "matmul": a 1x1 kernel (stride 1 or 2, no padding) is one dot_general over channels, and
    so are both its gradients;
  - "band": a "same"-padded 3x3 kernel (stride 1 or 2) with at least `BAND_MIN_FLOPS` of
    weight gradient keeps XLA's forward and input gradient but computes its weight gradient
    as matmuls (`weight_gradient`);
  - "xla": everything else (accelerators, small maps, dilation, groups) is
    `lax.conv_general_dilated` unchanged.

The weight gradient of a k x k conv with stride s and padding p = k // 2 is
  dw[dy, dx, c, o] = sum_{n,i,j} x[n, s*i + dy - p, s*j + dx - p, c] * g[n, i, j, o]
(x zero outside the map): for each kernel tap, one matmul of a column-shifted copy of the
input (a "band" of the map) with the output gradient over all N*Ho*Wo positions. Rather
than copying row slices of the input as well, the output gradient is shifted so that it
lines up with whole input rows.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

# Below this many weight-gradient FLOPs a 3x3 conv keeps XLA's own gradient: on small maps
# the band's copies cost more than the direct convolution loses. On the 2-core CPU the band
# lost at 1.2 GFLOP (32x32 and smaller maps) and won from 9.7 GFLOP (64x64 maps) in scratch
# runs; benchmarks/results/conv_layers_cpu.md times the model's layers above the threshold.
BAND_MIN_FLOPS = 4e9

Lowering = Literal["xla", "matmul", "band"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers: Any, lhs_shape: Sequence[int], rhs_shape: Sequence[int]) -> bool:
  if dimension_numbers is None:
    return False
  expected = lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
  return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == expected


def lowering(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int],
             padding: Any, *, dimension_numbers: Any = None, lhs_dilation: Any = None,
             rhs_dilation: Any = None, feature_group_count: int = 1,
             backend: str | None = None) -> Lowering:
  """How `conv_general_dilated` computes this call (see the module docstring)."""
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  if len(lhs_shape) != 4 or feature_group_count != 1 or isinstance(padding, str):
    return "xla"
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return "xla"
  if not _is_nhwc(dimension_numbers, lhs_shape, rhs_shape):
    return "xla"
  kh, kw, cin, cout = rhs_shape
  sh, sw = window_strides
  if kh != kw or kh not in (1, 3) or sh != sw or sh not in (1, 2):
    return "xla"
  if [tuple(p) for p in padding] != [(kh // 2, kh // 2)] * 2:
    return "xla"
  if kh == 1:
    return "matmul"
  n, h, w, _ = lhs_shape
  if not isinstance(n, int):
    # A symbolic batch (jax.export's serialised inference): the band only changes the
    # weight gradient, so XLA's convolution computes the same forward pass.
    return "xla"
  flops = 2 * n * -(-h // sh) * -(-w // sw) * kh * kw * cin * cout
  return "band" if flops >= BAND_MIN_FLOPS else "xla"


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, lowered to matmuls where that is faster (`lowering`)."""
  how: Lowering = "xla"
  if batch_group_count == 1 and preferred_element_type is None:
    how = lowering(lhs.shape, rhs.shape, window_strides, padding,
                   dimension_numbers=dimension_numbers, lhs_dilation=lhs_dilation,
                   rhs_dilation=rhs_dilation, feature_group_count=feature_group_count)
  stride = int(window_strides[0])
  if how == "matmul":
    # lax.slice, not lhs[:, ::s, ::s]: with a symbolic batch (jax.export) indexing becomes
    # a gather.
    strided = lax.slice(lhs, (0, 0, 0, 0), lhs.shape, (1, stride, stride, 1))
    return lax.dot_general(strided, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
  if how == "band":
    return _conv_with_band_weight_gradient(lhs, rhs, stride, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, precision: Any) -> jax.Array:
  pad = kernel.shape[0] // 2
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_band_weight_gradient(x: jax.Array, kernel: jax.Array, stride: int,
                                    precision: Any) -> jax.Array:
  return _xla_conv(x, kernel, stride, precision)


def _band_fwd(x, kernel, stride, precision):
  return _xla_conv(x, kernel, stride, precision), (x, kernel)


def _band_bwd(stride, precision, residuals, output_grad):
  x, kernel = residuals
  (input_grad,) = jax.linear_transpose(
      lambda x_: _xla_conv(x_, kernel, stride, precision), x)(output_grad)
  return input_grad, weight_gradient(x, output_grad, kernel.shape[0], stride, precision)


_conv_with_band_weight_gradient.defvjp(_band_fwd, _band_bwd)


def weight_gradient(x: jax.Array, output_grad: jax.Array, kernel_size: int, stride: int,
                    precision: Any = None) -> jax.Array:
  """d(conv(x, w))/dw contracted with `output_grad`, for padding kernel_size // 2, as
  matmuls; returns the kernel's [k, k, C_in, C_out] layout in `x`'s dtype."""
  k, s, pad = kernel_size, stride, kernel_size // 2
  ho, wo = output_grad.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  taps = [[None] * k for _ in range(k)]
  # One column shift at a time (not all k stacked) keeps the temporary to one input's size.
  for dx in range(k):
    columns = padded[:, :, dx:dx + s * (wo - 1) + 1:s]  # [N, H, Wo, C]
    for dy in range(k):
      # Kernel row dy meets input row r = s*i + dy - pad for output row i. Among the rows
      # of r's residue mod s, row m is r = residue + s*m, i.e. it meets i = m - shift.
      residue, shift = (dy - pad) % s, (dy - pad) // s
      rows = columns[:, residue::s]
      # The output gradient moved by `shift` rows and cut or zero-filled to `rows`' count
      # (lax.pad crops where the padding is negative): rows outside are the zero padding.
      aligned_grad = lax.pad(output_grad, jnp.zeros((), output_grad.dtype),
                             ((0, 0, 0), (shift, rows.shape[1] - ho - shift, 0),
                              (0, 0, 0), (0, 0, 0)))
      taps[dy][dx] = lax.dot_general(rows, aligned_grad, contract, precision=precision,
                                     preferred_element_type=jnp.float32)
  return jnp.stack([jnp.stack(row) for row in taps]).astype(x.dtype)
