r"""Scores a test set with imported or trained model variables, without training.

Imported checkpoints (see data_prep/convert_weights.py), e.g. an RD4AD model on MVTec AD:

  python -m ccl_jax.evaluate --config configs/mvtec_ad.py:rd --workdir ~/runs/rd4ad_eval \
      --variables rd4ad.msgpack \
      --config.model.encoder_weights=wide_resnet50_2.msgpack \
      --config.model.projector=off --config.model.neck_width_per_group=0 \
      --config.dataset.manual_dir=/data/mvtec_anomaly_detection

(RD4AD: no projector, neck width = the encoder's; the authors' CCL checkpoints: the default
CCL config with --variables ccl.msgpack and the converted teacher as encoder_weights.)
Writes metrics.json, results.md and heatmaps/ into --workdir and prints the table. Without
--variables it evaluates the best checkpoint of a training run in --workdir.
"""
from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from ccl_jax import inference, step, train, weights

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (for --variables).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (or the training run to evaluate).")
flags.DEFINE_string("variables", None, "Flax msgpack file of the model's variables "
                    "(projector/neck/decoder params and batch_stats).")


def load_model_variables(path: str, model, encoder, image_size: int):
  """Reads model variables and checks them against the architecture (never partially)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--variables: no file at {path!r}.")
  with open(path, "rb") as f:
    try:
      loaded = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
      raise ValueError(f"--variables: {path!r} is not a readable Flax msgpack file "
                       f"({type(e).__name__}: {e}).") from e
  features = jax.eval_shape(
      lambda: encoder.apply(encoder.init(jax.random.key(0), jnp.zeros((1, image_size,
                                                                        image_size, 3))),
                            jnp.zeros((1, image_size, image_size, 3))))
  template = jax.eval_shape(model.init, jax.random.key(0), features)
  weights.check_tree(loaded, template, f"--variables file {path!r}")
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), loaded)


def evaluate_variables(config, workdir: str, variables_path: str) -> dict:
  """Metrics of imported variables on the config's test set, written into `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  dataset = train.load_dataset(config, jax.process_index() == 0)
  encoder, model = train.build_models(config)
  mesh = step.data_mesh()
  encoder_variables = jax.device_put(weights.encoder_variables(
      encoder, config.model.encoder_weights, seed=config.seed, image_size=config.image_size),
      NamedSharding(mesh, P()))
  variables = load_model_variables(variables_path, model, encoder, config.image_size)
  summary, outputs = inference.evaluate_test_set(
      step.jit_predict(model, encoder), variables, encoder_variables, dataset,
      global_batch_size=config.eval_batch_size or config.batch_size,
      batch_sharding=NamedSharding(mesh, P("data")))
  result = {"metrics": summary, "variables": os.path.abspath(variables_path),
            "classes": list(dataset.class_names)}
  if jax.process_index() == 0:
    train.write_results(workdir, result, dataset, outputs, config.num_heatmaps_per_class)
  return result


def evaluate_workdir(workdir: str) -> dict:
  """Metrics of a training run's best checkpoint, written into its `eval/` folder."""
  trained = train.load_trained(workdir)
  dataset = train.load_dataset(trained.config, jax.process_index() == 0)
  summary, outputs = inference.evaluate_test_set(
      step.jit_predict(trained.model, trained.encoder), trained.variables,
      trained.encoder_variables, dataset,
      global_batch_size=trained.config.eval_batch_size or trained.config.batch_size,
      batch_sharding=NamedSharding(step.data_mesh(), P("data")))
  result = {"metrics": summary, "evaluated_step": trained.step,
            "classes": list(dataset.class_names)}
  if jax.process_index() == 0:
    train.write_results(os.path.join(workdir, "eval"), result, dataset, outputs,
                        trained.config.num_heatmaps_per_class)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
  if FLAGS.variables:
    if FLAGS.config is None:
      raise app.UsageError("--variables needs --config (the architecture and the data).")
    evaluate_variables(FLAGS.config, workdir, FLAGS.variables)
  else:
    evaluate_workdir(workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
