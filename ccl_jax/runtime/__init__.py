"""Devices and processes: joining a multi-host run, XLA options, preemption signals,
atomic file writes and storage errors, and batched inference over a dataset split."""
