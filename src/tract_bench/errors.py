"""The one exception type for bad user input: the CLIs print it as one line and exit with code 2."""


class UserError(Exception):
    """Bad input (a config value, a missing file): the message names the value and the fix."""
