"""Benchmarks of llmq; each subpackage has a run.py and a README, figures in RESULTS.md."""
