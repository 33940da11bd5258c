"""Producing a run: the CCL / RD training loop, HierCore fitting, and the runner that picks
one by the settings' model kind."""
