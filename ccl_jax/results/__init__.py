"""What a run reports: exact metrics, decision metrics, metrics.json / results.md,
heatmaps, report.html and TensorBoard events."""
