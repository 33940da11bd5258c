"""Producing a run: the CCL / RD training loop, HierCore fitting, and the runner that picks\none by the settings' model kind."""
