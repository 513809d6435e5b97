"""Prefect tasks: one thin wrapper per pipeline stage around one core function of `tuneline`."""
