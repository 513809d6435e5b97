"""Tuneline: fine-tune a language model as one retryable, resumable Prefect pipeline.

The core package holds every piece of logic as plain functions; `tasks/` and `flows/` wrap
them for Prefect. Nothing here imports Prefect.
"""

__version__ = "0.1.0"
