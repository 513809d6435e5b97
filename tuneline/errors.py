"""The one marker for errors a user fixes (recipe, data, sources, thresholds, model names).

Such an error is shown as its message, which names the file and line or the recipe field, the
bad value and the fix; a traceback is for Tuneline's own bugs only. That holds in logs too:
`quiet_user_errors` drops the traceback of a UserError from the records of Prefect's run loggers
(the terminal, and the run's log in the UI when a worker runs a deployment).
"""

import logging

# Prefect's run loggers and the root (its console handler); named, not imported: the core never
# imports Prefect.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect", "")


class UserError(Exception):
    """An error in what the user gave Tuneline; its message says what to change."""


def hide_user_error_tracebacks(record: logging.LogRecord) -> bool:
    """Logging filter: a user's mistake is logged as its message, without Tuneline's traceback."""
    if record.exc_info and isinstance(record.exc_info[1], UserError):
        record.exc_info = None
        record.exc_text = None
    return True


def quiet_user_errors(loggers: tuple[str, ...] = RUN_LOGGERS) -> None:
    """Put `hide_user_error_tracebacks` on the handlers of these loggers (once each)."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if hide_user_error_tracebacks not in handler.filters:
                handler.addFilter(hide_user_error_tracebacks)
