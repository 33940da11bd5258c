"""The process-wide XLA:CPU schedule option and the whole-map search it keeps small."""
import json
import os
import subprocess
import sys

import pytest

from ccl_jax.runtime import xla_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: XLA reads its flags once, when the first backend starts.
_PLAN_SCRIPT = """
import json, sys
from ccl_jax.runtime import xla_options
xla_options.use_cpu_low_memory_schedule(sys.argv[1] == "on")
import jax, jax.numpy as jnp
from ccl_jax.ccl import losses
features = jnp.zeros((16, 64, 64, 8))  # a 16 x 4096 x 4096 similarity if built whole
compiled = jax.jit(lambda a, b: losses.match_positions(a, b, None)).lower(
    features, features).compile()
print(json.dumps({"temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}))
"""


def _whole_map_search_temp_mib(schedule: str) -> float:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, schedule], env=env,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["temp_mib"]


def test_low_memory_schedule_keeps_one_block_of_the_whole_map_search_live():
  block_mib = 4 * 16 * (4096 // 16) * 4096 / 2**20  # 64 MiB blocks of 256 query rows
  assert _whole_map_search_temp_mib("on") < 2 * block_mib
  # The check can fail: XLA's default order holds all 16 blocks (1 GiB) at once.
  assert _whole_map_search_temp_mib("off") > 8 * block_mib


def test_refuses_once_backends_are_initialized(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  with pytest.raises(RuntimeError, match="before JAX initialises"):
    xla_options.use_cpu_low_memory_schedule(True)
  xla_options.use_cpu_low_memory_schedule(False)  # nothing asked, nothing to refuse


def test_a_choice_in_xla_flags_wins(monkeypatch):
  flags = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  monkeypatch.setenv("XLA_FLAGS", flags)
  xla_options.use_cpu_low_memory_schedule(True)
  assert os.environ["XLA_FLAGS"] == flags
