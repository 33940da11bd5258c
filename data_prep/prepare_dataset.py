r"""Prepares a dataset (TFDS array_record, resized once) ahead of training.

  python -m data_prep.prepare_dataset --dataset visa --manual_dir /data/VisA \
      --data_dir ~/ccl_jax_data --image_size 256 [--classes pcb1,pcb2] [--num_workers 8]
  python -m data_prep.prepare_dataset --dataset real_iad --manual_dir /data/Real-IAD \
      --real_iad_resolution 1024 [--real_iad_views C1] [--mask_resize bilinear_threshold]

The reading options are the training config's dataset keys of the same names (see
ccl_jax/config/settings.py), so a run with those keys finds what this command prepared.

Training prepares missing classes by itself; this command does it up front (e.g. once on a
machine with many cores before a multi-host run), prints the per-class counts and warns when
the totals differ from the published ones. Rerunning skips classes already prepared.
"""
import sys

from absl import app, flags

from ccl_jax import datasets
from ccl_jax.config import settings

# The dataset config keys this program takes as flags of the same names.
OPTION_KEYS = ("mask_resize", "real_iad_resolution", "real_iad_views", "manta_views",
               "normal_test_share")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  flags.DEFINE_string("dataset", None, "mvtec_ad | visa | btad | real_iad | manta | synthetic",
                      flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "The downloaded dataset folder.", flag_values=fv)
  flags.DEFINE_string("data_dir", "~/ccl_jax_data", "Where prepared data goes.",
                      flag_values=fv)
  flags.DEFINE_integer("image_size", 256, "Resolution the images are resized to once.",
                       flag_values=fv)
  flags.DEFINE_list("classes", ["all"], "Classes to prepare (default: all).", flag_values=fv)
  flags.DEFINE_integer("num_workers", None, "Decode/resize threads (default: min(8, cores)).",
                       flag_values=fv)
  for key in OPTION_KEYS:
    define = flags.DEFINE_float if key == "normal_test_share" else flags.DEFINE_string
    define(key, None, f"Config key dataset.{key} (default: the config's).", flag_values=fv)
  flags.mark_flags_as_required(["dataset"], flag_values=fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  classes = "all" if args.classes == ["all"] else tuple(args.classes)
  given = {key: getattr(args, key) for key in OPTION_KEYS if getattr(args, key) is not None}
  try:
    data = settings.from_dict({"dataset": {"name": args.dataset, **given}},
                              source="flags").dataset
    dataset = datasets.load(args.dataset, classes=classes, manual_dir=args.manual_dir,
                            data_dir=args.data_dir, image_size=args.image_size,
                            num_workers=args.num_workers, **data.reading_options(args.dataset))
  except (settings.ConfigError, datasets.DatasetError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.dataset}: {len(dataset.class_names)} classes, {len(dataset.train)} train / "
        f"{len(dataset.test)} test images ready in {args.data_dir}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
