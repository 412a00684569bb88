"""Prefect tasks: each wraps one library call of `sparcom` and adds what the UI shows."""
