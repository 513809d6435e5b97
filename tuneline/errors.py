"""The one marker for errors a user fixes (recipe, data, sources, thresholds, model names).

Such an error is shown as its message, which names the file and line or the recipe field, the
bad value and the fix; a traceback is for Tuneline's own bugs only.
"""


class UserError(Exception):
    """An error in what the user gave Tuneline; its message says what to change."""
