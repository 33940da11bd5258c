#!/usr/bin/env bash
# Installs everything the test suite needs and runs it: the README's test command, and what
# `.ci/run` calls. Root on Debian (chromium comes from apt); run it inside a virtualenv or a
# Python you are happy to install into. Extra arguments go to pytest (`-m slow` for the
# end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[dev,export,openvino,serve]"
# torch is a test-only dependency (checkpoint and PyTorch parity tests; ccl_jax never imports
# it). Pinned: on these machines 2.13.0 is a local CPU build; an unpinned torch would pull the
# registry's CUDA build.
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
# The report and serve page tests open pages in a real browser: Debian's chromium (about a
# minute to install on a 2-core machine).
if [[ -n "${CI:-}" ]] || ! command -v chromium >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m pytest -q "$@"
