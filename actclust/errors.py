"""The one exception type that means "the user gave bad input".

The CLI turns it into a single line ``actclust: error: ...`` and exit status 2;
anything else that escapes is an internal failure (exit 1).
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
