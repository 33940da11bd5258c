"""Training on several processes, as on a TPU pod slice or a multi-node GPU cluster: two JAX
processes on this machine, 2 CPU devices each, joined through a local coordinator, with
gloo for the collectives between processes.

Four launches of tests/multihost_worker.py (the program's body, `ccl_jax.training.runner.run`, on the
smoke config for one epoch of 9 steps) are shared by the tests:

  one       1 process x 4 devices, uninterrupted: the reference.
  crashed   2 processes x 2 devices, checkpointing every 4 steps; process 1 is killed
            (SIGKILL) as soon as a checkpoint is committed, while both train on.
  resumed2  a copy of crashed's workdir, resumed by 2 new processes to the end.
  resumed1  a copy of crashed's workdir, resumed by 1 process x 4 devices to the end.

Two more, after them, for preemption (test (f)):

  preempted          2 processes x 2 devices; process 1 alone gets SIGTERM mid-training.
  preempted_resumed  a copy of preempted's workdir, resumed by the same 2-process command.

They run on the smoke config's RD baseline by default (no contrastive terms and no
augmented view: a third of the compilation, which is nearly all of the time here; the
file takes 2.4 min on an idle 2-core machine), and on the CCL smoke config itself with
`pytest -m slow` (about twice as long). The contrastive terms add only more cross-device
reductions of the same kind, whose equality across device layouts tests/test_step.py
checks on one process.

All run in float64 (x64, float64 model) for the reason tests/test_step.py gives: in float32
the reduction order of the cross-device sums (gloo between processes, XLA's own within one)
moves near-cancelling gradient entries, Adam's first steps amplify that, and the runs drift
apart by far more than any bug would. In float64 the parameters agree to ~1e-6 after the
9 steps; the tolerance is test_step's 1e-5. The same mesh of 4 devices in both layouts
means the same program: only where the collectives run differs.

The one-process launches share a compilation cache (resumed1 finds everything compiled).
The two-process ones must not: JAX writes the cache from process 0 only, so process 0
would start training while process 1 still compiles, and gloo gives up setting up the
collectives of a new program when the processes reach it more than 30 s apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ccl_jax.datasets import selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
STEPS = 9            # one epoch: 72 training images (80 less the 10% held out) / batch 8
GLOBAL_BATCH = 8
CHECKPOINT_EVERY = 4
HEARTBEAT_TIMEOUT_S = 15
# Hard limits, so that a hang fails the test instead of holding up CI.
LAUNCH_TIMEOUT_S = 1200
SURVIVOR_TIMEOUT_S = 120
# Exit after the peer's death: heartbeat timeout, plus the service's check interval and the
# abort, with room for a loaded machine; JAX's default (100 s heartbeats) would fail this.
SURVIVOR_BOUND_S = HEARTBEAT_TIMEOUT_S + 30


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int, cache_dir: str | None = None, **extra: str
         ) -> dict[str, str]:
  # Nothing JAX- or XLA-related from the caller's environment: each launch says what it is.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1", **extra)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


@dataclasses.dataclass
class Launch:
  name: str
  workdir: str
  procs: list[subprocess.Popen]
  logs: list[str]
  started: float
  seconds: float | None = None  # until the last process exited
  timed_out: bool = False

  def output(self, i: int) -> str:
    with open(self.logs[i], errors="replace") as f:
      return f.read()

  def tail(self, i: int, chars: int = 4000) -> str:
    return f"--- {self.name} process {i} (rc {self.procs[i].returncode}) ---\n" + (
        self.output(i)[-chars:])

  def tails(self) -> str:
    return "\n".join(self.tail(i) for i in range(len(self.procs)))

  def poll(self) -> bool:
    """True once every process has exited."""
    done = all(p.poll() is not None for p in self.procs)
    if done and self.seconds is None:
      self.seconds = time.monotonic() - self.started
    return done

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def assert_succeeded(self) -> None:
    assert not self.timed_out, (f"{self.name} killed after {LAUNCH_TIMEOUT_S} s:\n"
                                + self.tails())
    bad = [i for i, p in enumerate(self.procs) if p.returncode != 0]
    assert not bad, "\n".join(self.tail(i) for i in bad)


def _wait(*launches: Launch) -> None:
  """Waits for all, each timed on its own; kills what outlives LAUNCH_TIMEOUT_S."""
  while not all(launch.poll() for launch in launches):
    for launch in launches:
      if not launch.poll() and time.monotonic() - launch.started > LAUNCH_TIMEOUT_S:
        launch.timed_out = True
        launch.kill()
    time.sleep(0.2)


def _launch(name: str, root, data_dir: str, cache_dir: str, variant: str, *,
            processes: int, args: tuple[str, ...] = ()) -> Launch:
  workdir = str(root / name)
  command = [sys.executable, WORKER, "--workdir", workdir, "--data_dir", data_dir,
             "--variant", variant, "--float64", "--record", str(root / f"{name}.rec"), *args]
  port = _free_port()
  procs, logs = [], []
  for i in range(processes):
    extra = {}
    if processes > 1:
      extra = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    logs.append(str(root / f"{name}.{i}.log"))
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(
          command + (["--distributed"] if processes > 1 else []), cwd=REPO, stdout=log,
          stderr=subprocess.STDOUT,
          env=_env(4 // processes, cache_dir if processes == 1 else None, **extra)))
  return Launch(name, workdir, procs, logs, time.monotonic())


@dataclasses.dataclass
class Crash:
  checkpoint_seen: bool
  survivor_rc: int | None
  survivor_seconds: float | None  # from the SIGKILL to the survivor's exit


def _kill_process_1_after_a_checkpoint(launch: Launch) -> Crash:
  latest = os.path.join(launch.workdir, "checkpoints", "latest")
  # Orbax writes into a temporary directory and renames it: a step's name means committed.
  while not (os.path.isdir(latest) and any(s.isdigit() for s in os.listdir(latest))):
    if launch.poll() or time.monotonic() - launch.started > LAUNCH_TIMEOUT_S:
      launch.timed_out = not launch.poll()
      launch.kill()
      return Crash(False, None, None)
    time.sleep(0.1)
  launch.procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  try:
    launch.procs[0].wait(timeout=SURVIVOR_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    launch.kill()
    return Crash(True, None, None)
  survivor_seconds = time.monotonic() - killed
  launch.procs[1].wait()
  launch.poll()
  return Crash(True, launch.procs[0].returncode, survivor_seconds)


@dataclasses.dataclass
class Runs:
  variant: str
  one: Launch
  crashed: Launch
  crash: Crash
  resumed2: Launch
  resumed1: Launch
  root: str
  num_test_images: dict[str, int]


# Slow (with `-m slow`): the launches of one parameter set take five to ten minutes.
@pytest.fixture(scope="module", params=[pytest.param("rd", marks=pytest.mark.slow),
                                        pytest.param("ccl", marks=pytest.mark.slow)])
def runs(request, smoke_data_dir, smoke_settings, tmp_path_factory):
  variant = request.param
  root = tmp_path_factory.mktemp(f"multihost_{variant}")
  cache_dir = str(root / "jax_cache")
  # Prepared once, here: the launches below would otherwise race to generate it.
  dataset = selection.load_selected(smoke_settings().dataset, image_size=32, is_main=True)
  num_test_images = {name: int(np.sum(dataset.test_class_ids == c))
                     for c, name in enumerate(dataset.class_names)}
  launch = lambda name, processes, *args: _launch(
      name, root, smoke_data_dir, cache_dir, variant, processes=processes, args=args)
  # The one-process reference and the crashing pair run side by side to share the time.
  one = launch("one", 1)
  crashed = launch("crashed", 2, "--checkpoint_every_steps", str(CHECKPOINT_EVERY),
                   "--heartbeat_timeout_s", str(HEARTBEAT_TIMEOUT_S))
  try:
    crash = _kill_process_1_after_a_checkpoint(crashed)
    _wait(one)
  finally:
    crashed.kill()
    one.kill()
  for name in ("resumed2", "resumed1"):
    shutil.copytree(crashed.workdir, root / name)
  resumed2, resumed1 = launch("resumed2", 2), launch("resumed1", 1)
  try:
    _wait(resumed2, resumed1)
  finally:
    resumed2.kill()
    resumed1.kill()
  print("seconds per launch: " + ", ".join(
      f"{l.name} {l.seconds or float('nan'):.0f}" for l in (one, crashed, resumed2, resumed1))
        + f"; process 0 exited {crash.survivor_seconds or float('nan'):.1f} s after the kill")
  return Runs(variant, one, crashed, crash, resumed2, resumed1, str(root), num_test_images)


@dataclasses.dataclass
class Preemption:
  signalled_at: int | None  # the step process 1's pipeline had reached when signalled
  preempted: Launch
  resumed: Launch


def _signal_process_1_during_training(launch: Launch, record: str) -> int | None:
  """SIGTERM to process 1 alone once its pipeline has handed over step 2's batch, as a
  scheduler preempting one host would; returns that step (None if training never got
  there)."""
  while True:
    if os.path.exists(record):
      with open(record) as f:
        steps = [json.loads(line)["step"] for line in f if '"train"' in line]
      if steps and max(steps) >= 2:
        launch.procs[1].send_signal(signal.SIGTERM)
        return max(steps)
    if launch.poll() or time.monotonic() - launch.started > LAUNCH_TIMEOUT_S:
      return None
    time.sleep(0.05)


@pytest.fixture(scope="module")
def preemption(runs, smoke_data_dir):
  """A two-process run of the reference's settings preempted by SIGTERM to process 1, then
  resumed by the same command."""
  root = pathlib.Path(runs.root)
  preempted = _launch("preempted", root, smoke_data_dir, "", runs.variant, processes=2)
  try:
    signalled_at = _signal_process_1_during_training(preempted, str(root / "preempted.rec.1"))
    _wait(preempted)
  finally:
    preempted.kill()
  shutil.copytree(preempted.workdir, root / "preempted_resumed")
  resumed = _launch("preempted_resumed", root, smoke_data_dir, "", runs.variant, processes=2)
  try:
    _wait(resumed)
  finally:
    resumed.kill()
  return Preemption(signalled_at, preempted, resumed)


def _checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints", "latest")
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def _latest_state(workdir: str) -> tuple[int, dict[str, np.ndarray]]:
  """Step and parameters + BatchNorm statistics of checkpoints/latest, as host arrays
  (whatever devices wrote it: only the values are compared)."""
  step = _checkpoint_steps(workdir)[-1]
  path = os.path.join(workdir, "checkpoints", "latest", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          tree)))
  leaves = jax.tree_util.tree_leaves_with_path(
      {"params": restored["params"], "batch_stats": restored["batch_stats"]})
  return int(restored["step"]), {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_same_state(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-5,
                               err_msg=name)


def _records(runs: Runs, name: str, processes: int) -> list[list[dict]]:
  out = []
  for i in range(processes):
    with open(os.path.join(runs.root, f"{name}.rec.{i}")) as f:
      out.append([json.loads(line) for line in f])
  return out


def _train_rows(records: list[dict]) -> dict[int, list[int]]:
  return {r["step"]: r["indices"] for r in records if r["kind"] == "train"}


def _eval_passes(records: list[dict]) -> dict[int, tuple[int, list[int]]]:
  passes: dict[int, tuple[int, list[int]]] = {}
  for r in records:
    if r["kind"] == "eval":
      passes.setdefault(r["pass"], (r["size"], []))[1].extend(r["positions"])
  return passes


def _metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def test_two_processes_train_to_the_parameters_of_one(runs):
  """(a) Nine steps on 2 processes x 2 devices (up to the checkpoint in the crashed launch,
  the rest after resuming) end at the parameters and BatchNorm statistics of 9 steps on
  1 process x 4 devices."""
  runs.one.assert_succeeded()
  runs.resumed2.assert_succeeded()
  step_one, one = _latest_state(runs.one.workdir)
  step_two, two = _latest_state(runs.resumed2.workdir)
  assert step_one == step_two == STEPS
  _assert_same_state(two, one)
  # The runs must have trained on after the checkpoint for the comparison to mean anything.
  _, start = _latest_state(runs.crashed.workdir)
  assert max(np.max(np.abs(one[k] - start[k])) for k in one) > 1e-3


def test_each_process_reads_only_its_share_of_every_batch(runs):
  """(b) At every step each process's pipeline yields 4 rows, the two shares are disjoint,
  and process 0's followed by process 1's are the batch the one-process run reads."""
  runs.one.assert_succeeded()
  runs.resumed2.assert_succeeded()
  (one,) = [_train_rows(r) for r in _records(runs, "one", 1)]
  assert sorted(one) == list(range(STEPS))
  every_row = [i for step in range(STEPS) for i in one[step]]
  assert len(every_row) == len(set(every_row)) == STEPS * GLOBAL_BATCH  # an epoch: each once
  shares = {}
  for name in ("crashed", "resumed2"):
    first, second = [_train_rows(r) for r in _records(runs, name, 2)]
    for step in set(first) & set(second):
      shares[step] = (first[step], second[step])
  # The steps before the checkpoint come from the crashed pair, the others from the resumed.
  assert sorted(shares) == list(range(STEPS))
  for step, (first, second) in shares.items():
    assert len(first) == len(second) == GLOBAL_BATCH // 2, step
    assert not set(first) & set(second), step
    assert first + second == one[step], step


def test_evaluation_counts_every_test_image_once(runs):
  """(c) In each evaluation pass of the two-process run the real (not padding) rows of the
  two processes are disjoint and together every position exactly once, and the metrics,
  per-class image counts and thresholds equal the one-process run's."""
  runs.one.assert_succeeded()
  runs.resumed2.assert_succeeded()
  (one_passes,) = [_eval_passes(r) for r in _records(runs, "one", 1)]
  first, second = [_eval_passes(r) for r in _records(runs, "resumed2", 2)]
  # Validation loss, hold-out scores, test set, ...: the same passes, in the same order.
  assert first.keys() == second.keys() == one_passes.keys() and len(one_passes) >= 3
  for k, (size, positions) in one_passes.items():
    assert first[k][0] == second[k][0] == size
    assert sorted(positions) == list(range(size))
    assert not set(first[k][1]) & set(second[k][1]), k
    assert sorted(first[k][1] + second[k][1]) == list(range(size)), k
  sizes = {size for size, _ in one_passes.values()}
  assert sum(runs.num_test_images.values()) in sizes
  # 44 test images in batches of 8: the last batch is half padding.
  assert any(size % GLOBAL_BATCH for size in sizes)

  one, two = _metrics(runs.one.workdir), _metrics(runs.resumed2.workdir)
  counts = ("n_normal", "n_anomalous", "tp", "fp", "fn", "tn")
  for part in ("classwise", "agnostic"):
    for name, expected in runs.num_test_images.items():
      row = two[part]["per_class"][name]
      assert row["n_normal"] + row["n_anomalous"] == expected
      assert {c: row[c] for c in counts} == {c: one[part]["per_class"][name][c] for c in counts}
  # The parameters agree to 1e-5 (not bit for bit: the gradient sums run in another order),
  # and AUPRO, an integral over per-region overlaps, moves by up to 1e-4 of itself with them.
  # The counts above are exact; the metrics must agree to the parameters' precision.
  assert two["metrics"]["mean"] == pytest.approx(one["metrics"]["mean"], rel=5e-4, abs=1e-5)
  for name in runs.num_test_images:
    assert two["metrics"]["per_class"][name] == pytest.approx(
        one["metrics"]["per_class"][name], rel=5e-4, abs=1e-5)
  with open(os.path.join(runs.one.workdir, "decision.json")) as f:
    thresholds_one = json.load(f)["thresholds"]
  with open(os.path.join(runs.resumed2.workdir, "decision.json")) as f:
    thresholds_two = json.load(f)["thresholds"]
  assert thresholds_two["per_group"] == pytest.approx(thresholds_one["per_group"], rel=1e-5)
  assert thresholds_two["num_normal"] == thresholds_one["num_normal"]


def test_two_process_checkpoint_resumes_in_two_processes_and_in_one(runs):
  """(d) The checkpoint the crashed pair wrote resumes on 2 processes and on 1 process x 4
  devices, and both continue to the uninterrupted run's parameters, validation loss and
  metrics."""
  runs.one.assert_succeeded()
  assert runs.crash.checkpoint_seen, runs.crashed.tails()
  checkpoint_step, _ = _latest_state(runs.crashed.workdir)
  assert 0 < checkpoint_step < STEPS and checkpoint_step % CHECKPOINT_EVERY == 0
  _, one = _latest_state(runs.one.workdir)
  expected = _metrics(runs.one.workdir)
  for launch, processes in ((runs.resumed2, 2), (runs.resumed1, 1)):
    launch.assert_succeeded()
    # Each process's first batch was the checkpoint's next: the run went on from there.
    for records in _records(runs, launch.name, processes):
      assert min(_train_rows(records)) == checkpoint_step
    step, state = _latest_state(launch.workdir)
    assert step == STEPS
    _assert_same_state(state, one)
    resumed = _metrics(launch.workdir)
    assert [h["validation_loss"] for h in resumed["history"]] == pytest.approx(
        [h["validation_loss"] for h in expected["history"]], rel=1e-6)
    assert resumed["metrics"]["mean"] == pytest.approx(expected["metrics"]["mean"], abs=1e-5)


def test_a_killed_process_stops_the_other_with_a_clear_error(runs):
  """(e) SIGKILL of process 1 mid-training: process 0 exits, with an error, within the
  heartbeat timeout plus a margin, saying that the other process stopped."""
  crash = runs.crash
  assert crash.checkpoint_seen, runs.crashed.tails()
  assert crash.survivor_seconds is not None, (
      f"process 0 still running {SURVIVOR_TIMEOUT_S} s after process 1 was killed:\n"
      + runs.crashed.tail(0))
  survivor = runs.crashed.output(0)
  assert crash.survivor_rc != 0, runs.crashed.tail(0)
  assert crash.survivor_seconds < SURVIVOR_BOUND_S, runs.crashed.tail(0)
  # Either JAX's coordination service names the silent process, or the collective process 0
  # was in lost its connection to process 1 first, and ccl_jax.runtime.distributed exits on it.
  by_heartbeats = ("detected fatal errors" in survivor
                   and "stopped sending heartbeats" in survivor)
  by_connection = ("ccl_jax: process 0 of 2 stopped on the error above" in survivor
                   and "by peer" in survivor)
  assert by_heartbeats or by_connection, runs.crashed.tail(0)
  # It was training: past a checkpoint, before the end of the epoch and the evaluation.
  assert not os.path.exists(os.path.join(runs.crashed.workdir, "metrics.json"))
  assert _checkpoint_steps(runs.crashed.workdir)[-1] < STEPS


def test_sigterm_to_one_process_stops_both_at_one_saved_step_that_resumes(runs, preemption):
  """(f) SIGTERM to process 1 mid-training: both processes agree on one step (JAX's
  preemption sync point), save it, say so in one line and exit with code 75; the same
  command resumes from that step to the uninterrupted run's parameters and metrics."""
  runs.one.assert_succeeded()
  launch = preemption.preempted
  assert preemption.signalled_at is not None, launch.tails()
  assert not launch.timed_out, launch.tails()
  assert [p.returncode for p in launch.procs] == [75, 75], launch.tails()
  lines = [[line for line in launch.output(i).splitlines() if "Preempted" in line]
           for i in range(2)]
  assert [len(l) for l in lines] == [1, 1], launch.tails()
  stopped = {int(l[0].split("saved step ")[1].split()[0]) for l in lines}
  assert len(stopped) == 1, lines  # one step, agreed by both
  (step,) = stopped
  assert preemption.signalled_at <= step < STEPS, lines
  assert _checkpoint_steps(launch.workdir) == [step]
  assert not os.path.exists(os.path.join(launch.workdir, "metrics.json"))
  preemption.resumed.assert_succeeded()
  for records in _records(runs, "preempted_resumed", 2):
    assert min(_train_rows(records)) == step
  final_step, state = _latest_state(preemption.resumed.workdir)
  _, one = _latest_state(runs.one.workdir)
  assert final_step == STEPS
  _assert_same_state(state, one)
  resumed, expected = _metrics(preemption.resumed.workdir), _metrics(runs.one.workdir)
  assert resumed["metrics"]["mean"] == pytest.approx(expected["metrics"]["mean"], abs=1e-5)


_FAILING_PROCESS = """
import sys
sys.path.insert(0, {repo!r})
from ccl_jax.runtime import distributed
distributed.initialize(heartbeat_timeout_s=5)
import jax
from jax.experimental import multihost_utils
if jax.process_index() == 1:
  raise ValueError("deliberate failure in process 1")
multihost_utils.sync_global_devices("waits for process 1")
"""


def test_an_exception_in_one_process_stops_the_others_promptly():
  """Process 1 raises while process 0 waits for it in a collective: process 1 exits at
  once with its traceback, and process 0 within the heartbeat timeout. Without
  ccl_jax.runtime.distributed's exit, process 1 would wait at JAX's shutdown barrier (300 s)."""
  port = _free_port()
  script = _FAILING_PROCESS.format(repo=REPO)
  procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(
                                1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  started = time.monotonic()
  try:
    outputs = [p.communicate(timeout=90)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  seconds = time.monotonic() - started
  assert procs[1].returncode == 1, outputs[1][-3000:]
  assert "ValueError: deliberate failure in process 1" in outputs[1]
  assert "process 1 of 2 stopped on the error above" in outputs[1]
  assert procs[0].returncode != 0, outputs[0][-3000:]
  assert "stopped sending heartbeats" in outputs[0], outputs[0][-3000:]
  assert seconds < 60


_JOIN = """
import sys
sys.path.insert(0, {repo!r})
from ccl_jax.runtime import distributed
try:
  distributed.initialize(initialization_timeout_s=2)
except RuntimeError as e:
  print(e)
"""


@pytest.mark.parametrize("settings, message", [
    ({}, "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "Could not reach the coordinator at"),
])
def test_failing_to_join_says_what_to_check(settings, message):
  """No cluster settings, or a coordinator nobody listens on: a Python error that says
  what to check, where JAX raises a bare ValueError or aborts the process."""
  env = _env(1, **settings)
  if settings:
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
  out = subprocess.run([sys.executable, "-c", _JOIN.format(repo=REPO)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert message in out.stdout
