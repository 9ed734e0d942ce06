"""Observability: the run's metrics history (metrics.jsonl) and wandb, the live progress line, the run report
and a sweep's results table and plot. Rank 0 and the driver call into it; it calls into nothing above it."""
