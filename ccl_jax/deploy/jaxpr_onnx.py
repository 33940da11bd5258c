"""JAX functions as ONNX graphs, translated primitive by primitive from their jaxpr.

`convert(fn, specs, input_names, output_names)` traces `fn` at `specs` (a symbolic batch
dimension 'b' allowed) and writes one ONNX node (or a few) per jaxpr equation, so the graph
computes the function JAX compiles, not a re-implementation of the model. Closed-over
arrays (the weights) become initializers; equations whose inputs are all constants are
evaluated here (BatchNorm scales, transposed kernels, HierCore's per-chunk memory slices).

Why our own translator: jax2onnx 0.17.1 (PyPI) requires orbax-checkpoint < 0.11.37 while
this project needs >= 0.12.8. The models here use a small
set of primitives; the ones without a direct ONNX operator are lowered differently:

* conv_general_dilated: ONNX Conv in NCHW, its result left in NCHW for the elementwise ops
  and reductions after it (`_Value.perm`), so Transposes remain only where the layout has
  to change; with lhs_dilation (flax's ConvTranspose) it becomes ConvTranspose with the
  kernel flipped and the padding mirrored.
* dot_general: a 1x1 Conv for [B, H, W, C] x [C, O] with constant weights (how
  `ccl_jax.models.conv` computes 1x1 convolutions on the CPU), MatMul for other
  matrix-vector products, else Einsum. The 2x2 transposed convolution of
  `models.resnet.Deconv2x2` (an einsum and a reshape) becomes a 1x1 Conv and a
  DepthToSpace that waits until the elementwise ops after it (BatchNorm, ReLU) have run
  on the Conv's output, where ONNX Runtime folds them into the Conv.
* broadcast_in_dim: a Reshape adding unit axes, left to the consumers' numpy broadcasting;
  Expand only where a consumer needs the full shape.
* scan (HierCore's chunked nearest-neighbour search): unrolled, one copy of the body per
  step (the memory chunks are then constants sliced here).
* jax.nn.leaky_relu (CCL's projector): LeakyRelu instead of its compare-and-select.
* reduce_window_sum (HierCore's 3x3 neighbourhood sum): a depthwise Conv of ones;
  reduce_window_max (ResNet's stem): MaxPool.
* gather (a group's memory bank by group id): Gather along the indexed axis.
A primitive outside the table is an error naming it, never a silently different graph.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np
import onnx
from jax.extend import core as jax_core
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
BATCH = "b"  # the symbolic batch dimension's name, in specs and in the graph


@dataclasses.dataclass
class _Value:
  """A jaxpr value during translation: a graph tensor `name`, or a known constant.

  `lazy`: the tensor has the value's rank but unit axes where the value is broadcast
  (broadcast_in_dim); elementwise consumers broadcast it, others `full()` it first.
  `perm`: the tensor holds transpose(value, perm) (None: the value's own axis order);
  convolutions leave NCHW results, and elementwise ops and reductions keep that layout, so
  a chain of layers needs no Transpose between them. Constants are kept in jax's order.
  """
  shape: tuple[Any, ...]
  name: str | None = None
  const: np.ndarray | None = None
  lazy: bool = False
  perm: tuple[int, ...] | None = None
  layouts: dict[tuple[int, ...], str] = dataclasses.field(default_factory=dict)
  # The 1x1 convolution [B, bs*bs*C, H, W] a value came from (`_pointwise_conv`), and, once
  # reshaped to [B, bs*H, bs*W, C], the depth-to-space still to be applied to `name`.
  source: tuple[str, tuple[int, ...]] | None = None
  depth_to_space: tuple[int, int] | None = None  # (block size, channels)


def _dim_linear(dim) -> tuple[int, int]:
  """(a, c) with dim = a + c * b for a concrete or symbolic dimension."""
  if isinstance(dim, (int, np.integer)):
    return int(dim), 0
  text = str(dim)
  # The text of a linear dimension expression is Python arithmetic ('b', '2*b', 'b + 1').
  try:
    values = [int(eval(text, {"__builtins__": {}}, {BATCH: b}))  # pylint: disable=eval-used
              for b in (0, 1, 2)]
  except (NameError, SyntaxError, TypeError) as err:
    raise NotImplementedError(f"dimension {text}: only a + c*{BATCH} is supported.") from err
  a, c = values[0], values[1] - values[0]
  if values[2] != a + 2 * c:
    raise NotImplementedError(f"dimension {text}: only a + c*{BATCH} is supported.")
  return a, c


def _is_concrete(shape: Sequence[Any]) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in shape)


class _Graph:
  """The ONNX nodes and initializers being written."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._names = itertools.count()
    self._const_names: dict[int, str] = {}
    self._kept: list[np.ndarray] = []  # keeps the arrays alive, so their ids stay unique
    self.batch: str | None = None  # [1] int64 tensor of the batch size, set by convert

  def fresh(self, hint: str) -> str:
    return f"{hint}_{next(self._names)}"

  def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs) -> list[str]:
    names = [self.fresh(op.lower()) for _ in range(outputs)]
    self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
    return names

  def one(self, op: str, inputs: Sequence[str], **attrs) -> str:
    return self.node(op, inputs, **attrs)[0]

  def constant(self, array: np.ndarray) -> str:
    array = np.asarray(array)
    key = id(array)
    if key not in self._const_names:
      name = self.fresh("const")
      self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
      self._const_names[key] = name
      self._kept.append(array)
    return self._const_names[key]

  def ints(self, values: Sequence[int]) -> str:
    return self.constant(np.asarray(values, np.int64))

  def shape_tensor(self, shape: Sequence[Any], minus_one: bool = False) -> str:
    """[rank] int64 tensor of `shape`; `minus_one`: one symbolic entry may be -1 (Reshape)."""
    if _is_concrete(shape):
      return self.ints(shape)
    symbolic = [i for i, d in enumerate(shape) if not isinstance(d, (int, np.integer))]
    if minus_one and len(symbolic) == 1:
      return self.ints([-1 if i in symbolic else int(d) for i, d in enumerate(shape)])
    pieces = []
    for d in shape:
      a, c = _dim_linear(d)
      if c == 0:
        pieces.append(self.ints([a]))
        continue
      piece = self.batch if c == 1 else self.one("Mul", [self.batch, self.ints([c])])
      pieces.append(piece if a == 0 else self.one("Add", [piece, self.ints([a])]))
    return self.one("Concat", pieces, axis=0)

  def tensor(self, value: _Value, perm: Sequence[int] | None = None) -> str:
    """A tensor of `value` (possibly lazy) holding transpose(value, perm) (None: the
    value's own axis order)."""
    self.settle(value)
    rank = len(value.shape)
    perm = tuple(perm) if perm is not None else tuple(range(rank))
    if perm not in value.layouts:
      if value.const is not None:
        value.layouts[perm] = self.constant(np.transpose(value.const, perm) if rank else
                                            value.const)
      else:
        have = value.perm or tuple(range(rank))
        if have == perm:
          value.layouts[perm] = value.name
        else:
          # The tensor is transpose(value, have); value = transpose(tensor, argsort(have)).
          inverse = np.argsort(have)
          value.layouts[perm] = self.one("Transpose", [value.name],
                                         perm=[int(inverse[p]) for p in perm])
    return value.layouts[perm]

  def settle(self, value: _Value) -> None:
    """Applies a pending depth-to-space: `value` becomes an NCHW tensor."""
    if value.depth_to_space is not None:
      block, _ = value.depth_to_space
      value.name = self.one("DepthToSpace", [value.name], blocksize=block, mode="DCR")
      value.perm, value.depth_to_space = (0, 3, 1, 2), None

  def full(self, value: _Value, perm: Sequence[int] | None = None) -> str:
    """`tensor(value, perm)` with its full shape."""
    perm = tuple(perm) if perm is not None else tuple(range(len(value.shape)))
    shape = [value.shape[p] for p in perm]
    if value.const is not None and value.lazy and _is_concrete(value.shape):
      return self.constant(np.transpose(np.broadcast_to(value.const, value.shape), perm))
    name = self.tensor(value, perm)
    if value.lazy:
      return self.one("Expand", [name, self.shape_tensor(shape)])
    return name


_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
                "min": "Min", "pow": "Pow", "gt": "Greater", "ge": "GreaterOrEqual",
                "lt": "Less", "le": "LessOrEqual", "eq": "Equal", "and": "And", "or": "Or",
                "rem": "Mod"}
_UNARY = {"sqrt": "Sqrt", "exp": "Exp", "log": "Log", "neg": "Neg", "abs": "Abs",
          "tanh": "Tanh", "logistic": "Sigmoid", "floor": "Floor", "ceil": "Ceil",
          "not": "Not", "sign": "Sign", "erf": "Erf"}
_IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
# Elementwise primitives that can run before a pending depth-to-space (`_Value`).
_KEEPS_DEPTH_TO_SPACE = {"add", "sub", "mul", "div", "max", "min", "convert_element_type",
                         "rsqrt", "sqrt", "neg", "exp", "abs", "stop_gradient", "copy",
                         "copy_p", "optimization_barrier"}
_SUBJAXPR = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
             "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
             "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL,
               np.dtype(np.float64): TensorProto.DOUBLE}


def _onnx_type(dtype) -> int:
  dtype = np.dtype(dtype)
  if dtype not in _ONNX_TYPES:
    raise NotImplementedError(f"dtype {dtype} has no ONNX counterpart here.")
  return _ONNX_TYPES[dtype]


class _Translator:
  """Writes the equations of a jaxpr into a `_Graph`."""

  def __init__(self, graph: _Graph):
    self.g = graph

  def run(self, jaxpr: jax_core.Jaxpr, consts: Sequence[Any],
          args: Sequence[_Value]) -> list[_Value]:
    env: dict[Any, _Value] = {}

    def read(atom) -> _Value:
      if isinstance(atom, jax_core.Literal):
        return _Value(tuple(np.shape(atom.val)), const=np.asarray(atom.val))
      return env[atom]

    for var, value in zip(jaxpr.constvars, consts):
      env[var] = _Value(tuple(np.shape(value)), const=np.asarray(value))
    for var, value in zip(jaxpr.invars, args):
      env[var] = value
    for eqn in jaxpr.eqns:
      outputs = self.equation(eqn, [read(v) for v in eqn.invars])
      for var, value in zip(eqn.outvars, outputs):
        env[var] = value
    return [read(v) for v in jaxpr.outvars]

  # -- one equation ---------------------------------------------------------------------------

  def equation(self, eqn, inputs: list[_Value]) -> list[_Value]:
    name = eqn.primitive.name
    out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]
    if (name in ("pjit", "jit") and eqn.params.get("name") == "leaky_relu"
        and inputs[1].const is not None):
      # jax.nn.leaky_relu: one LeakyRelu rather than its compare-and-select (Where was a
      # tenth of the small model's ONNX Runtime time).
      return [self._unary("LeakyRelu", inputs[0], out_shapes[0],
                          alpha=float(np.asarray(inputs[1].const).reshape(())))]
    if name in _SUBJAXPR:
      closed = eqn.params[_SUBJAXPR[name]]
      inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
      return self.run(inner, getattr(closed, "consts", ()), inputs)
    if name == "scan":
      return self.scan(eqn, inputs)
    if (all(v.const is not None for v in inputs) and all(map(_is_concrete, out_shapes))
        and name != "broadcast_in_dim"):
      values = [np.broadcast_to(v.const, v.shape) for v in inputs]
      results = eqn.primitive.bind(*values, **eqn.params)
      results = results if eqn.primitive.multiple_results else [results]
      return [_Value(tuple(np.shape(r)), const=np.asarray(r)) for r in results]
    handler = getattr(self, f"_{name}", None)
    out_shape = out_shapes[0]
    if name not in _KEEPS_DEPTH_TO_SPACE:
      for value in inputs:
        self.g.settle(value)
    if name in _ELEMENTWISE or name in _UNARY or name in _IDENTITY:
      return [self.elementwise(name, inputs, out_shape)]
    if handler is None:
      raise NotImplementedError(
          f"jaxpr primitive {name!r} has no ONNX lowering in ccl_jax.deploy.jaxpr_onnx; add one "
          "there (export with --format jax meanwhile).")
    return [handler(eqn, inputs, out_shape)]

  def _common_layout(self, inputs: list[_Value], out_shape) -> tuple[list[str], dict]:
    """The inputs of an elementwise op as tensors in one layout (that of the first
    permuted input of the output's rank), and the result's lazy/perm fields.

    Before a pending depth-to-space (the decoder's 2x2 transposed convolution) the op runs
    on the convolution's own output, with per-channel constants repeated for each of the
    block's positions, so ONNX Runtime folds a BatchNorm and ReLU there into the
    convolution."""
    pending = next((v.depth_to_space for v in inputs if v.depth_to_space is not None), None)
    if pending is not None:
      block, channels = pending
      def per_channel(v: _Value) -> bool:
        return v.depth_to_space == pending or (
            v.const is not None and (v.const.size == 1 or tuple(v.const.shape) == (
                1, 1, 1, channels)))
      if all(per_channel(v) for v in inputs):
        names = []
        for v in inputs:
          if v.depth_to_space is not None:
            names.append(v.name)
          elif v.const.size == 1:
            names.append(self.g.constant(v.const.reshape(())))
          else:
            names.append(self.g.constant(np.tile(v.const.reshape(channels), block * block)
                                         .reshape(1, -1, 1, 1)))
        return names, {"depth_to_space": pending}
      for v in inputs:
        self.g.settle(v)
    rank = len(out_shape)
    perm = next((v.perm for v in inputs if v.perm is not None and len(v.shape) == rank),
                None)
    names = [self.g.tensor(v, perm if len(v.shape) == rank else None) for v in inputs]
    lazy = all(v.lazy or tuple(v.shape) != tuple(out_shape) for v in inputs)
    return names, {"lazy": lazy, "perm": perm}

  def elementwise(self, name: str, inputs: list[_Value], out_shape) -> _Value:
    if name == "sub" and inputs[1].const is not None and inputs[1].const.dtype.kind == "f":
      # x + (-c): ONNX Runtime folds Add (not Sub) of a constant into a preceding Conv,
      # which turns a BatchNorm's (x - mean) * scale + bias into the Conv's own weights.
      name, inputs = "add", [inputs[0], _Value(inputs[1].shape, const=-inputs[1].const,
                                               lazy=inputs[1].lazy)]
    if name == "max" and inputs[1].const is not None and inputs[1].const.size == 1 and (
        float(inputs[1].const.reshape(())) == 0.0) and inputs[0].const is None:
      # Relu, which ONNX Runtime fuses into the convolution before it.
      return self._unary("Relu", inputs[0], out_shape)
    names, fields = self._common_layout(inputs, out_shape)
    if name in _IDENTITY:
      return _Value(out_shape, names[0], **fields)
    op = _ELEMENTWISE.get(name) or _UNARY[name]
    if name == "rem":
      result = self.g.one(op, names, fmod=1)
    else:
      result = self.g.one(op, names)
    return _Value(out_shape, result, **fields)

  def scan(self, eqn, inputs: list[_Value]) -> list[_Value]:
    p = eqn.params
    body, length = p["jaxpr"], p["length"]
    consts = inputs[:p["num_consts"]]
    carry = inputs[p["num_consts"]:p["num_consts"] + p["num_carry"]]
    xs = inputs[p["num_consts"] + p["num_carry"]:]
    ys: list[list[_Value]] = []
    steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
    for i in steps:
      slices = [self._index(x, i) for x in xs]
      outputs = self.run(body.jaxpr, body.consts, consts + carry + slices)
      carry, step_ys = outputs[:len(carry)], outputs[len(carry):]
      ys.append(step_ys)
    if p["reverse"]:
      ys.reverse()
    stacked = []
    for j, var in enumerate(eqn.outvars[len(carry):]):
      parts = [step[j] for step in ys]
      if all(v.const is not None for v in parts):
        stacked.append(_Value(tuple(var.aval.shape), const=np.stack(
            [np.broadcast_to(v.const, v.shape) for v in parts])))
      else:
        axes = self.g.ints([0])
        stacked.append(_Value(tuple(var.aval.shape), self.g.one(
            "Concat", [self.g.one("Unsqueeze", [self.g.full(v), axes]) for v in parts],
            axis=0)))
    return carry + stacked

  def _index(self, value: _Value, i: int) -> _Value:
    if value.const is not None:
      return _Value(tuple(value.shape[1:]), const=np.broadcast_to(value.const, value.shape)[i])
    return _Value(tuple(value.shape[1:]), self.g.one(
        "Gather", [self.g.full(value), self.g.constant(np.asarray(i, np.int64))], axis=0))

  # -- handlers: _<primitive>(eqn, inputs, out_shape) -> _Value ------------------------------

  def _unary(self, op: str, x: _Value, out_shape, **attrs) -> _Value:
    if x.depth_to_space is not None:
      return _Value(out_shape, self.g.one(op, [x.name], **attrs),
                    depth_to_space=x.depth_to_space)
    return _Value(out_shape, self.g.one(op, [self.g.tensor(x, x.perm)], **attrs), lazy=x.lazy,
                  perm=x.perm)

  def _convert_element_type(self, eqn, inputs, out_shape):
    return self._unary("Cast", inputs[0], out_shape, to=_onnx_type(eqn.params["new_dtype"]))

  def _rsqrt(self, eqn, inputs, out_shape):
    root = self._unary("Sqrt", inputs[0], out_shape)
    return self._unary("Reciprocal", root, out_shape)

  def _square(self, eqn, inputs, out_shape):
    return self.elementwise("mul", inputs * 2, out_shape)

  def _integer_pow(self, eqn, inputs, out_shape):
    exponent = np.asarray(eqn.params["y"], eqn.outvars[0].aval.dtype)
    return self.elementwise("pow", [inputs[0], _Value((), const=exponent)], out_shape)

  def _ne(self, eqn, inputs, out_shape):
    return self._unary("Not", self.elementwise("eq", inputs, out_shape), out_shape)

  def _select_n(self, eqn, inputs, out_shape):
    which, *cases = inputs
    if len(cases) != 2:
      raise NotImplementedError(f"select_n with {len(cases)} cases has no ONNX lowering.")
    if eqn.invars[0].aval.dtype != np.bool_:
      which = self._unary("Cast", which, which.shape, to=TensorProto.BOOL)
    (condition, false, true), fields = self._common_layout([which, *cases], out_shape)
    return _Value(out_shape, self.g.one("Where", [condition, true, false]), **fields)

  def _clamp(self, eqn, inputs, out_shape):
    low, x, high = inputs
    return self.elementwise("min", [self.elementwise("max", [x, low], out_shape), high],
                            out_shape)

  def _broadcast_in_dim(self, eqn, inputs, out_shape):
    (x,) = inputs
    rank_shape = [1] * len(out_shape)
    for source, target in enumerate(eqn.params["broadcast_dimensions"]):
      rank_shape[target] = x.shape[source]
    exact = tuple(rank_shape) == tuple(out_shape)
    if x.const is not None and _is_concrete(x.shape):
      return _Value(out_shape, const=np.broadcast_to(x.const, x.shape).reshape(rank_shape),
                    lazy=not exact)
    name = self.g.full(x)
    if tuple(rank_shape) != tuple(x.shape):
      name = self.g.one("Reshape", [name, self.g.shape_tensor(rank_shape, minus_one=True)])
    return _Value(out_shape, name, lazy=not exact)

  def _reshape(self, eqn, inputs, out_shape):
    (x,) = inputs
    if x.source is not None and len(x.shape) == 6 and len(out_shape) == 4:
      conv, features = x.source
      block = features[0]
      b, h, d, w, e, c = x.shape
      # [B, h, d, w, e, C] (read from the conv's [B, d*e*C, h, w]) -> [B, h*d, w*e, C]: a
      # depth-to-space, left pending so elementwise ops can run on the conv's output.
      if (tuple(features) == (block, block, c) and d == e == block
          and x.perm == (0, 2, 4, 5, 1, 3)
          and tuple(out_shape[1:]) == (h * block, w * block, c)):
        return _Value(out_shape, conv, depth_to_space=(block, int(c)))
    self.g.settle(x)
    blocks = _reshape_blocks(x.shape, out_shape) if x.perm is not None or (
        len(out_shape) == 4) else None
    if blocks is None:
      return _Value(out_shape, self.g.one("Reshape", [self.g.full(x), self.g.shape_tensor(
          out_shape, minus_one=True)]))
    # Reshape in a layout where every block of merged/split axes stays together: the
    # tensor's own if it allows that, else channels first for a 4-D result (the layout the
    # next convolution wants).
    have = x.perm or tuple(range(len(x.shape)))
    position = {a: i for i, a in enumerate(have)}
    if all([position[a] for a in ins] == list(range(position[ins[0]], position[ins[0]]
                                                    + len(ins))) for ins, _ in blocks):
      order = sorted(blocks, key=lambda block: position[block[0][0]])
    elif len(out_shape) == 4:
      by_output = {outs[0]: (ins, outs) for ins, outs in blocks if outs}
      order = [by_output[a] for a in (0, 3, 1, 2) if a in by_output]
      if len(order) != len([b for b in blocks if b[1]]) or any(not outs for _, outs in blocks):
        order = blocks
    else:
      order = blocks
    in_perm = tuple(a for ins, _ in order for a in ins)
    out_perm = tuple(a for _, outs in order for a in outs)
    name = self.g.one("Reshape", [self.g.full(x, in_perm), self.g.shape_tensor(
        [out_shape[a] for a in out_perm], minus_one=True)])
    return _Value(out_shape, name,
                  perm=None if out_perm == tuple(range(len(out_shape))) else out_perm)

  def _squeeze(self, eqn, inputs, out_shape):
    (x,) = inputs
    return _Value(out_shape, self.g.one("Squeeze", [self.g.full(x),
                                                    self.g.ints(eqn.params["dimensions"])]))

  def _expand_dims(self, eqn, inputs, out_shape):
    (x,) = inputs
    return _Value(out_shape, self.g.one("Unsqueeze", [self.g.full(x),
                                                      self.g.ints(eqn.params["dimensions"])]))

  def _transpose(self, eqn, inputs, out_shape):
    # No node: the result is the same tensor, read in another layout.
    (x,) = inputs
    have = x.perm or tuple(range(len(x.shape)))
    inverse = np.argsort(eqn.params["permutation"])
    perm = tuple(int(inverse[a]) for a in have)
    return _Value(out_shape, self.g.tensor(x, have), lazy=x.lazy,
                  perm=None if perm == tuple(range(len(perm))) else perm, source=x.source)

  def _concatenate(self, eqn, inputs, out_shape):
    perm = inputs[0].perm if all(v.perm == inputs[0].perm for v in inputs) else None
    have = perm or tuple(range(len(out_shape)))
    return _Value(out_shape, self.g.one("Concat", [self.g.full(v, have) for v in inputs],
                                        axis=have.index(eqn.params["dimension"])), perm=perm)

  def _iota(self, eqn, inputs, out_shape):
    raise NotImplementedError("iota with a batch-dependent shape has no ONNX lowering.")

  def _slice(self, eqn, inputs, out_shape):
    (x,) = inputs
    p = eqn.params
    limits = [int(l) if isinstance(l, (int, np.integer)) else np.iinfo(np.int64).max
              for l in p["limit_indices"]]
    strides = p["strides"] or [1] * len(limits)
    have = x.perm or tuple(range(len(limits)))
    return _Value(out_shape, self.g.one("Slice", [
        self.g.full(x, have), self.g.ints([p["start_indices"][a] for a in have]),
        self.g.ints([limits[a] for a in have]), self.g.ints(range(len(limits))),
        self.g.ints([strides[a] for a in have])]), perm=x.perm)

  def _pad(self, eqn, inputs, out_shape):
    x, fill = inputs
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config):
      raise NotImplementedError("pad with interior padding has no ONNX lowering here.")
    name = self.g.full(x)
    if any(lo < 0 or hi < 0 for lo, hi, _ in config):
      rank = len(config)
      name = self.g.one("Slice", [
          name, self.g.ints([max(-lo, 0) for lo, _, _ in config]),
          self.g.ints([-max(-hi, 0) if hi < 0 else np.iinfo(np.int64).max
                       for _, hi, _ in config]), self.g.ints(range(rank))])
    pads = [max(lo, 0) for lo, _, _ in config] + [max(hi, 0) for _, hi, _ in config]
    if any(pads):
      name = self.g.one("Pad", [name, self.g.ints(pads), self.g.tensor(fill)], mode="constant")
    return _Value(out_shape, name)

  def _reduce(self, eqn, inputs, out_shape, op: str):
    (x,) = inputs
    axes = tuple(eqn.params["axes"])
    have = x.perm or tuple(range(len(x.shape)))
    kept = [a for a in have if a not in axes]  # the result's axes, in the tensor's order
    perm = tuple(a - sum(r < a for r in axes) for a in kept)
    return _Value(out_shape, self.g.one(op, [self.g.full(x, have),
                                             self.g.ints([have.index(a) for a in axes])],
                                        keepdims=0),
                  perm=None if perm == tuple(sorted(perm)) else perm)

  def _reduce_sum(self, eqn, inputs, out_shape):
    return self._reduce(eqn, inputs, out_shape, "ReduceSum")

  def _reduce_max(self, eqn, inputs, out_shape):
    return self._reduce(eqn, inputs, out_shape, "ReduceMax")

  def _reduce_min(self, eqn, inputs, out_shape):
    return self._reduce(eqn, inputs, out_shape, "ReduceMin")

  def _argmax(self, eqn, inputs, out_shape, op: str = "ArgMax"):
    (x,) = inputs
    (axis,) = eqn.params["axes"]
    index = self.g.one(op, [self.g.full(x)], axis=axis, keepdims=0, select_last_index=0)
    return _Value(out_shape, self.g.one("Cast", [index],
                                        to=_onnx_type(eqn.params["index_dtype"])))

  def _argmin(self, eqn, inputs, out_shape):
    return self._argmax(eqn, inputs, out_shape, "ArgMin")

  def _dot_general(self, eqn, inputs, out_shape):
    lhs, rhs = inputs
    ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)) = eqn.params["dimension_numbers"]
    lhs_rank, rhs_rank = len(lhs.shape), len(rhs.shape)
    same_dtype = np.dtype(eqn.outvars[0].aval.dtype) == np.dtype(eqn.invars[0].aval.dtype)
    for data, weight, data_contract, weight_contract, data_first in (
        (lhs, rhs, lhs_contract, rhs_contract, True),
        (rhs, lhs, rhs_contract, lhs_contract, False)):
      if (len(data.shape) == 4 and data.const is None and weight.const is not None
          and not lhs_batch and tuple(data_contract) == (3,) and len(weight_contract) == 1
          and same_dtype):
        return self._pointwise_conv(data, weight, weight_contract[0], data_first, out_shape)
    a, b = self.g.full(lhs), self.g.full(rhs)
    if (not lhs_batch and rhs_rank == 2 and tuple(lhs_contract) == (lhs_rank - 1,)
        and tuple(rhs_contract) == (0,)):
      result = self.g.one("MatMul", [a, b])
    else:
      letters = iter("abcdefghijklmnopqrstuvwxyz")
      lhs_axes = [next(letters) for _ in range(lhs_rank)]
      rhs_axes = [next(letters) for _ in range(rhs_rank)]
      for l, r in zip(lhs_contract, rhs_contract):
        rhs_axes[r] = lhs_axes[l]
      for l, r in zip(lhs_batch, rhs_batch):
        rhs_axes[r] = lhs_axes[l]
      out = ([lhs_axes[i] for i in lhs_batch]
             + [lhs_axes[i] for i in range(lhs_rank) if i not in (*lhs_contract, *lhs_batch)]
             + [rhs_axes[i] for i in range(rhs_rank) if i not in (*rhs_contract, *rhs_batch)])
      equation = f"{''.join(lhs_axes)},{''.join(rhs_axes)}->{''.join(out)}"
      result = self.g.one("Einsum", [a, b], equation=equation)
    out_dtype = np.dtype(eqn.outvars[0].aval.dtype)
    if out_dtype != np.dtype(eqn.invars[0].aval.dtype):
      result = self.g.one("Cast", [result], to=_onnx_type(out_dtype))
    return _Value(out_shape, result)

  def _pointwise_conv(self, data: _Value, weight: _Value, contract: int, data_first: bool,
                      out_shape) -> _Value:
    """[B, H, W, C] x a constant [C, *F] (any axis order; either operand first) as a 1x1
    convolution with prod(F) outputs: how models.conv runs 1x1 convolutions on the CPU,
    and the einsum of models.resnet.Deconv2x2. The result stays [B, *F, H, W]."""
    free = [a for a in range(len(weight.shape)) if a != contract]
    kernel = np.transpose(np.broadcast_to(weight.const, weight.shape), free + [contract])
    features = [int(weight.shape[a]) for a in free]
    kernel = kernel.reshape(int(np.prod(features)), -1)[:, :, None, None]
    y = conv = self.g.one("Conv", [self.g.full(data, (0, 3, 1, 2)),
                                   self.g.constant(np.ascontiguousarray(kernel))])
    if len(features) != 1:
      y = self.g.one("Reshape", [y, self.g.shape_tensor(
          [data.shape[0], *features, data.shape[1], data.shape[2]], minus_one=True)])
    n = len(features)
    # Result axes: (b, h, w, *F) or (*F, b, h, w); the tensor holds (b, *F, h, w).
    perm = (0, *range(3, 3 + n), 1, 2) if data_first else (n, *range(n), n + 1, n + 2)
    return _Value(out_shape, y, perm=None if perm == tuple(range(n + 3)) else perm,
                  source=(conv, tuple(features)))

  def _conv_general_dilated(self, eqn, inputs, out_shape):
    x, kernel = inputs
    p = eqn.params
    if kernel.const is None:
      raise NotImplementedError("conv_general_dilated with a non-constant kernel.")
    if p["batch_group_count"] != 1:
      raise NotImplementedError("conv_general_dilated with batch_group_count > 1.")
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    weight = np.transpose(np.broadcast_to(kernel.const, kernel.shape), rhs_spec)  # O, I, *k
    spatial = len(lhs_spec) - 2
    lhs_dilation = tuple(p["lhs_dilation"] or (1,) * spatial)
    rhs_dilation = list(p["rhs_dilation"] or (1,) * spatial)
    padding = [tuple(int(v) for v in pair) for pair in p["padding"]]
    nchw = self.g.full(x, tuple(lhs_spec))
    groups = p["feature_group_count"]
    if any(d != 1 for d in lhs_dilation):
      if groups != 1 or any(s != 1 for s in p["window_strides"]) or any(
          d != 1 for d in rhs_dilation):
        raise NotImplementedError("a dilated-input convolution with groups, strides or "
                                  "kernel dilation.")
      # conv(dilate(x), K) with padding (lo, hi) == ConvTranspose(x, flip(K)) with stride
      # = the dilation and padding (k - 1 - lo, k - 1 - hi).
      sizes = weight.shape[2:]
      pads = [k - 1 - lo for k, (lo, _) in zip(sizes, padding)] + [
          k - 1 - hi for k, (_, hi) in zip(sizes, padding)]
      if min(pads) < 0:
        raise NotImplementedError("ConvTranspose with negative padding.")
      flipped = np.ascontiguousarray(
          np.flip(weight, axis=tuple(range(2, 2 + spatial))).swapaxes(0, 1))
      y = self.g.one("ConvTranspose", [nchw, self.g.constant(flipped)],
                     strides=list(lhs_dilation), pads=pads)
    else:
      pads = [lo for lo, _ in padding] + [hi for _, hi in padding]
      if min(pads) < 0:
        raise NotImplementedError("Conv with negative padding.")
      y = self.g.one("Conv", [nchw, self.g.constant(np.ascontiguousarray(weight))],
                     strides=list(p["window_strides"]), pads=pads, dilations=rhs_dilation,
                     group=groups)
    return _Value(out_shape, y, perm=tuple(int(i) for i in out_spec))

  def _spatial_window(self, eqn, x: _Value) -> tuple[str, dict[str, list[int]]]:
    """(x as NCHW, the window's ONNX attributes) of a reduce_window over H, W of NHWC."""
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    base = p.get("base_dilation") or (1,) * len(window)
    dilation = p.get("window_dilation") or (1,) * len(window)
    if (len(window) != 4 or window[0] != 1 or window[3] != 1 or tuple(padding[0]) != (0, 0)
        or tuple(padding[3]) != (0, 0) or any(d != 1 for d in (*base, *dilation))):
      raise NotImplementedError(f"{eqn.primitive.name} other than a spatial window on NHWC.")
    nchw = self.g.full(x, (0, 3, 1, 2))
    return nchw, {"kernel_shape": list(window[1:3]), "strides": list(strides[1:3]),
                  "pads": [padding[1][0], padding[2][0], padding[1][1], padding[2][1]]}

  def _reduce_window_sum(self, eqn, inputs, out_shape):
    (x,) = inputs
    nchw, window = self._spatial_window(eqn, x)
    channels = int(x.shape[3])
    ones = np.ones([channels, 1] + window.pop("kernel_shape"),
                   np.dtype(eqn.invars[0].aval.dtype))
    y = self.g.one("Conv", [nchw, self.g.constant(ones)], group=channels, **window)
    return _Value(out_shape, y, perm=(0, 3, 1, 2))

  def _reduce_window_max(self, eqn, inputs, out_shape):
    (x,) = inputs
    nchw, window = self._spatial_window(eqn, x)
    # MaxPool ignores its padding, as the -inf padding of the jax window does.
    y = self.g.one("MaxPool", [nchw], **window)
    return _Value(out_shape, y, perm=(0, 3, 1, 2))

  def _gather(self, eqn, inputs, out_shape):
    operand, indices = inputs
    numbers = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    rank = len(operand.shape)
    batch_rank = len(indices.shape) - 1
    simple = (tuple(numbers.start_index_map) == (0,) and tuple(numbers.collapsed_slice_dims)
              == (0,) and not numbers.operand_batching_dims and indices.shape[-1] == 1
              and tuple(sizes[1:]) == tuple(operand.shape[1:])
              and tuple(numbers.offset_dims) == tuple(range(batch_rank, batch_rank + rank - 1)))
    if not simple:
      raise NotImplementedError(f"gather with dimension numbers {numbers} (only indexing "
                                "the leading axis has an ONNX lowering here).")
    index = self.g.one("Squeeze", [self.g.full(indices), self.g.ints([-1])])
    return _Value(out_shape, self.g.one("Gather", [self.g.full(operand), index], axis=0))

  def _dynamic_slice(self, eqn, inputs, out_shape):
    x, *starts = inputs
    if not all(s.const is not None for s in starts):
      raise NotImplementedError("dynamic_slice at data-dependent positions.")
    sizes = eqn.params["slice_sizes"]
    begin = [int(np.clip(int(s.const), 0, int(d) - int(n)))
             for s, d, n in zip(starts, x.shape, sizes)]
    return _Value(out_shape, self.g.one("Slice", [
        self.g.full(x), self.g.ints(begin), self.g.ints([b + int(n) for b, n in
                                                         zip(begin, sizes)]),
        self.g.ints(range(len(begin)))]))


def _reshape_blocks(shape_in, shape_out) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
  """The reshape as blocks (input axes, output axes) of equal size, each the fewest
  consecutive axes on both sides; None when a symbolic dimension is merged or split."""
  blocks, i, j = [], 0, 0
  while i < len(shape_in) or j < len(shape_out):
    ins, outs = [i] if i < len(shape_in) else [], [j] if j < len(shape_out) else []
    if not ins or not outs:
      return None
    a, b = shape_in[i], shape_out[j]
    if not (_is_concrete([a]) and _is_concrete([b])):
      if str(a) != str(b):
        return None
      blocks.append(((i,), (j,)))
      i, j = i + 1, j + 1
      continue
    size_in, size_out = int(a), int(b)
    i, j = i + 1, j + 1
    while size_in != size_out:
      if size_in < size_out:
        if i >= len(shape_in) or not _is_concrete([shape_in[i]]):
          return None
        size_in *= int(shape_in[i])
        ins.append(i)
        i += 1
      else:
        if j >= len(shape_out) or not _is_concrete([shape_out[j]]):
          return None
        size_out *= int(shape_out[j])
        outs.append(j)
        j += 1
    blocks.append((tuple(ins), tuple(outs)))
  return blocks


def _value_info(name: str, aval) -> onnx.ValueInfoProto:
  dims = [d if isinstance(d, (int, np.integer)) else str(d) for d in aval.shape]
  return helper.make_tensor_value_info(name, _onnx_type(aval.dtype), dims)


def _prune(graph: _Graph, outputs: Sequence[str]) -> None:
  """Drops nodes and initializers the outputs do not depend on."""
  needed = set(outputs)
  kept = []
  for node in reversed(graph.nodes):
    if any(o in needed for o in node.output):
      kept.append(node)
      needed.update(node.input)
  graph.nodes = kept[::-1]
  graph.initializers = [t for t in graph.initializers if t.name in needed]


def convert(fn: Callable[..., Any], specs: Sequence[jax.ShapeDtypeStruct],
            input_names: Sequence[str], output_names: Sequence[str]) -> onnx.ModelProto:
  """The ONNX model (opset OPSET) of `fn(*inputs)`, the inputs shaped as `specs` (whose
  dimension named 'b' stays symbolic), the outputs in `fn`'s order of its flat results."""
  closed = jax.make_jaxpr(fn)(*specs)
  if len(closed.in_avals) != len(input_names) or len(closed.out_avals) != len(output_names):
    raise ValueError(f"{len(input_names)} input and {len(output_names)} output names for a "
                     f"function of {len(closed.in_avals)} inputs and {len(closed.out_avals)} "
                     "outputs.")
  graph = _Graph()
  args = [_Value(tuple(aval.shape), name) for aval, name in zip(closed.in_avals, input_names)]
  batch_inputs = [name for aval, name in zip(closed.in_avals, input_names)
                  if aval.shape and not isinstance(aval.shape[0], (int, np.integer))]
  if batch_inputs:
    graph.batch = graph.one("Shape", [batch_inputs[0]], start=0, end=1)
  results = _Translator(graph).run(closed.jaxpr, closed.consts, args)
  for value, name in zip(results, output_names):
    graph.nodes.append(helper.make_node("Identity", [graph.full(value)], [name]))
  _prune(graph, output_names)
  onnx_graph = helper.make_graph(
      graph.nodes, "ccl_jax",
      [_value_info(n, a) for n, a in zip(input_names, closed.in_avals)],
      [_value_info(n, a) for n, a in zip(output_names, closed.out_avals)],
      initializer=graph.initializers)
  model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="ccl_jax.deploy.jaxpr_onnx")
  onnx.checker.check_model(model)
  return model
