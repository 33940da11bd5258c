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

import argparse
import sys

import numpy as np


def _count(tree) -> tuple[int, int]:
  import jax
  leaves = jax.tree_util.tree_leaves(tree)
  return len(leaves), int(sum(np.size(x) for x in leaves))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.convert_weights",
      description="PyTorch checkpoint -> ccl_jax Flax msgpack variables (no PyTorch needed).")
  parser.add_argument("--kind", required=True, choices=("resnet", "rd4ad", "ccl"))
  parser.add_argument("--encoder", required=True,
                      help="resnet18, resnet34, resnet50 or wide_resnet50_2")
  parser.add_argument("--input", required=True, help=".pth/.pt (zip or legacy) or .safetensors")
  parser.add_argument("--output", required=True, help="Flax msgpack file to write")
  parser.add_argument("--encoder_output", default=None,
                      help="--kind ccl only: also write the teacher (net_t) encoder variables")
  args = parser.parse_args(argv)
  if args.encoder_output and args.kind != "ccl":
    parser.error("--encoder_output only applies to --kind ccl")

  from ccl_jax import convert, variable_files
  from ccl_jax.torch_checkpoint import load_state_dict

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


if __name__ == "__main__":
  sys.exit(main())
