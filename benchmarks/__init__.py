"""Reproducible speed and memory comparisons that print ratios measured side by side in one run."""
