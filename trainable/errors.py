"""The one exception type for mistakes the user can fix."""


class UserError(Exception):
    """Bad input: a config value, a data path, a space file, a flag.

    The CLI prints its message as one line on stderr and exits with status 2, never a
    traceback, so the message must name the file or key and say what is allowed.
    """
