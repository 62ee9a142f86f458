"""Researcher tools, run from the repository root as `python -m tools.NAME` (the Makefile does it): benchmarks,
sweeps, checkpoint averaging, perplexity, export, plots. A tool imports lessons and gptkit, never another tool."""
