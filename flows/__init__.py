"""Prefect flows: the DAG wiring of the pipeline, no data loops and no I/O of their own."""
