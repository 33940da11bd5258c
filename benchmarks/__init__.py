"""Benchmarks of ccl_jax (and the PyTorch reference they compare against)."""
