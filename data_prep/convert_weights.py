"""Converts PyTorch checkpoints into ccl_jax Flax msgpack variable files, without PyTorch.

  python -m data_prep.convert_weights --kind resnet --encoder wide_resnet50_2 \
      --input wide_resnet50_2-95faca4d.pth --output wide_resnet50_2.msgpack

Kinds:
  resnet  torchvision/timm ResNet state dict (.pth/.pt or .safetensors) -> encoder variables,
          the file `--config.model.encoder_weights` takes.
  rd4ad   RD4AD checkpoint {'bn': ..., 'decoder': ...} -> plain-RD neck + decoder variables.
  ccl     the authors' CCL (RDLGC) `net.pth`/`ckpt.pth` -> projector + neck + decoder
          variables; `--encoder_output` also writes its teacher (net_t) as encoder variables.

Bad input (unreadable, truncated, unsafe or wrong-architecture checkpoints) prints the
reason and exits with status 1; no output file is written then.
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

KINDS = ("resnet", "rd4ad", "ccl")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  flags.DEFINE_enum("kind", None, list(KINDS), "What the checkpoint holds.",
                    flag_values=flag_values)
  flags.DEFINE_string("encoder", None, "resnet18, resnet34, resnet50 or wide_resnet50_2",
                      flag_values=flag_values)
  flags.DEFINE_string("input", None, ".pth/.pt (zip or legacy) or .safetensors",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "Flax msgpack file to write", flag_values=flag_values)
  flags.DEFINE_string("encoder_output", None, "--kind ccl only: also write the teacher "
                      "(net_t) encoder variables", flag_values=flag_values)
  flags.mark_flags_as_required(["kind", "encoder", "input", "output"],
                               flag_values=flag_values)
  flags.register_validator(
      "encoder_output", lambda value: value is None or flag_values["kind"].value == "ccl",
      message="--encoder_output only applies to --kind ccl", flag_values=flag_values)


def _count(tree) -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_leaves(tree)
  return len(leaves), int(sum(np.size(x) for x in leaves))


def run(args: flags.FlagValues) -> int:
  """The conversion on parsed flags; 0 on success, 1 (with the reason on stderr) on bad
  input, and then no output file is written."""
  from ccl_jax.weights import convert, variable_files
  from ccl_jax.weights.torch_checkpoint import load_state_dict  # pylint: disable=import-outside-toplevel

  try:
    checkpoint = load_state_dict(args.input)
    source = f"{args.kind} checkpoint {args.input!r}"
    outputs = []
    if args.kind == "resnet":
      outputs.append((args.output, convert.resnet_encoder_variables(
          checkpoint, args.encoder, source=source)))
    elif args.kind == "rd4ad":
      outputs.append((args.output, convert.rd4ad_variables(
          checkpoint, args.encoder, source=source)))
    else:
      outputs.append((args.output, convert.ccl_variables(checkpoint, args.encoder,
                                                         source=source)))
      if args.encoder_output:
        outputs.append((args.encoder_output, convert.ccl_encoder_variables(
            checkpoint, args.encoder, source=source)))
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for path, variables in outputs:  # only once everything converted
    variable_files.save(path, variables)
    arrays, numbers = _count(variables)
    print(f"wrote {path}: {arrays} arrays, {numbers:,} numbers ({args.encoder}, {args.kind})")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sys.exit(run(flags.FLAGS))


if __name__ == "__main__":
  define_flags()
  app.run(main)
