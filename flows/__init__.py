"""Prefect flows: each reads like the pipeline diagram; the work is in `sparcom`."""
