"""Metrics: perplexity family (per-window NLL), resources (throughput, memory)."""
