"""The one exception type for user errors: caught at the CLI, printed as one line, exit 2."""


class UserError(Exception):
    """Bad input from the user. The message says the value, the place, and the fix (the flag)."""
