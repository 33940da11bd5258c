"""What a run reports: exact metrics, decision metrics, metrics.json / results.md,\nheatmaps, report.html and TensorBoard events."""
