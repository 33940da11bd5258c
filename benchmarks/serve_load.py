r"""Load test of `python -m ccl_jax.serve` on localhost, against `predict --model`.

  python -m benchmarks.serve_load --model /tmp/ccl_demo_model --images photos/ \
      [--requests 256] [--clients 16] [--max_wait_ms 5]

Bounded: each measurement sends --requests requests (the images in turn, multipart, as
`curl -F` does) from a fixed number of concurrent clients (1 and --clients), keeping each
client's connection open, and stops when all are answered. The server runs in its own
process (`python -m ccl_jax.serve --port 0`), once with batching (--max_batch 16,
--max_wait_ms) and once without (--max_batch 1); the clients (asyncio, httpx) share the
machine with it. Reports per request the median and 99th percentile latency and the images
per second over the whole run, and the mean batch the server formed.

The reference is `ccl_jax.predict.predict_images` on the same model directory and images
(what `python -m ccl_jax.predict --model` runs, minus its start-up), at batch 1 and 16,
timed after a first untimed pass (compilation): images/s, and the time per batch of 1 as
its latency. Every server answer is checked against predict's row of the same image: the
class, its source and the decision equal, the score within 1e-5 relative (batches of other
sizes may round the last bits differently); the largest difference is reported.

Prints a markdown table and writes benchmarks/results/serve_load_<model kind>.json and .md
unless --output says otherwise.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
from absl import app, flags

from benchmarks.train_step import RESULTS, machine
from ccl_jax import predict
from ccl_jax.decisions import grouping, thresholds
from ccl_jax.deploy import loader

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory of `python -m ccl_jax.export`.")
flags.DEFINE_multi_string("images", None, "Images, as predict's --images.")
flags.DEFINE_string("backend", "jax", "Backend of ccl_jax.deploy.loader.")
flags.DEFINE_integer("requests", 256, "Requests per measurement.", lower_bound=1)
flags.DEFINE_integer("clients", 16, "Concurrent clients of the loaded measurements.",
                     lower_bound=2)
flags.DEFINE_integer("max_batch", 16, "The batching server's --max_batch.", lower_bound=2)
flags.DEFINE_float("max_wait_ms", 5.0, "The batching server's --max_wait_ms.", lower_bound=0)
flags.DEFINE_string("output", None, "Result file (.json; a .md beside it); default "
                    "benchmarks/results/serve_load_<model kind>.json.")
flags.mark_flags_as_required(["model", "images"])

SCORE_TOLERANCE = 1e-5


def predict_reference(model_dir: str, backend: str, paths: list[str]) -> dict[str, Any]:
  """predict --model's rows for `paths`, and its speed at batch 1 and 16."""
  model = loader.load(model_dir, backend)
  groups = grouping.Groups.from_json(model.manifest["groups"])
  cutoffs = thresholds.Thresholds.from_json(model.manifest["thresholds"])
  result: dict[str, Any] = {}
  for batch_size in (1, 16):
    predict.predict_images(model, groups, cutoffs, paths, batch_size=batch_size)  # compiles
    start = time.perf_counter()
    rows = predict.predict_images(model, groups, cutoffs, paths, batch_size=batch_size)
    seconds = time.perf_counter() - start
    result[f"batch_{batch_size}"] = {"images_per_s": len(paths) / seconds,
                                     "seconds_per_image": seconds / len(paths)}
  result["rows"] = rows
  return result


class Server:
  """`python -m ccl_jax.serve` in a subprocess on a free port of 127.0.0.1."""

  def __init__(self, model_dir: str, backend: str, max_batch: int, max_wait_ms: float,
               queue_size: int):
    self.process = subprocess.Popen(
        [sys.executable, "-m", "ccl_jax.serve", f"--model={model_dir}",
         f"--backend={backend}", "--port=0", f"--max_batch={max_batch}",
         f"--max_wait_ms={max_wait_ms}", f"--max_queue={queue_size}",
         f"--max_connections={queue_size}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = self.process.stdout.readline()
    if not line.startswith("Serving"):
      raise RuntimeError(f"the server did not start: {line!r}")
    self.url = line.split(" on ", 1)[1].strip().rstrip("/")
    for _ in range(3000):
      try:
        if httpx.get(self.url + "/readyz").status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.1)
    raise RuntimeError("the server never became ready")

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(60)


async def _load(url: str, files: list[tuple[str, bytes]], requests: int, clients: int
                ) -> tuple[list[float], float, list[tuple[int, dict, int]]]:
  """(latencies, wall seconds, (image index, answer, batch size) of each request)."""
  order = iter(range(requests))
  latencies: list[float] = []
  answers: list[tuple[int, dict, int]] = []

  async def client(session: httpx.AsyncClient):
    for k in order:
      index = k % len(files)
      start = time.perf_counter()
      answer = await session.post(url + "/v1/predict", files={"image": files[index]})
      latencies.append(time.perf_counter() - start)
      answer.raise_for_status()
      answers.append((index, answer.json(), int(answer.headers["X-Batch-Size"])))

  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(limits=limits, timeout=120) as session:
    start = time.perf_counter()
    await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies, time.perf_counter() - start, answers


def measure(url: str, files, requests: int, clients: int, rows: list[dict]) -> dict:
  asyncio.run(_load(url, files, 2 * clients, clients))  # warm connections and caches
  latencies, seconds, answers = asyncio.run(_load(url, files, requests, clients))
  worst = 0.0
  for index, answer, _ in answers:
    row = rows[index]
    same = all(answer[k] == row[k] for k in ("class", "class_source", "decision"))
    if not same or answer["threshold"] != row["threshold"]:
      raise AssertionError(f"answer {answer} differs from predict's row {row}")
    worst = max(worst, abs(answer["score"] - row["score"]) / abs(row["score"]))
  if worst > SCORE_TOLERANCE:
    raise AssertionError(f"scores differ from predict's by up to {worst:.2e} (relative)")
  return {"clients": clients, "requests": requests,
          "p50_ms": 1000 * float(np.percentile(latencies, 50)),
          "p99_ms": 1000 * float(np.percentile(latencies, 99)),
          "images_per_s": requests / seconds,
          "mean_batch": float(np.mean([size for *_, size in answers])),
          "max_score_difference": worst}


def table(result: dict[str, Any]) -> str:
  lines = ["| path | clients | p50 ms | p99 ms | images/s | mean batch |",
           "|---|---:|---:|---:|---:|---:|"]
  reference = result["predict"]
  for batch in (1, 16):
    entry = reference[f"batch_{batch}"]
    latency = f"{1000 * entry['seconds_per_image']:.1f}" if batch == 1 else "n/a"
    lines.append(f"| predict --model, --batch_size {batch} | n/a | {latency} | n/a | "
                 f"{entry['images_per_s']:.1f} | {batch} |")
  for run in result["serve"]:
    lines.append(f"| serve, {run['server']} | {run['clients']} | {run['p50_ms']:.1f} | "
                 f"{run['p99_ms']:.1f} | {run['images_per_s']:.1f} | "
                 f"{run['mean_batch']:.1f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  paths = predict.list_images(FLAGS.images)
  files = []
  for path in paths:
    with open(path, "rb") as f:
      files.append((os.path.basename(path), f.read()))
  reference = predict_reference(FLAGS.model, FLAGS.backend, paths)
  rows = reference.pop("rows")
  kind = loader.read_manifest(FLAGS.model)["model_kind"]
  result: dict[str, Any] = {
      "machine": machine(), "model_kind": kind, "backend": FLAGS.backend,
      "images": len(paths), "predict": reference, "serve": []}
  servers = ((f"batching (--max_batch {FLAGS.max_batch}, --max_wait_ms {FLAGS.max_wait_ms:g})",
              FLAGS.max_batch, FLAGS.max_wait_ms),
             ("no batching (--max_batch 1)", 1, 0.0))
  for name, max_batch, max_wait_ms in servers:
    server = Server(FLAGS.model, FLAGS.backend, max_batch, max_wait_ms,
                    queue_size=4 * FLAGS.clients)
    try:
      for clients in (1, FLAGS.clients):
        run = measure(server.url, files, FLAGS.requests, clients, rows)
        result["serve"].append({"server": name, **run})
        print(f"{name}, {clients} clients: {run}", flush=True)
    finally:
      server.stop()
  text = table(result)
  print(text)
  output = FLAGS.output or os.path.join(RESULTS, f"serve_load_{kind}.json")
  with open(output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  with open(os.path.splitext(output)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
