"""The one exception type the CLI turns into a one-line message and exit code 2."""


class DdpmkitError(Exception):
    """A problem with the user's input or environment (bad flag, missing file, checksum...).

    Raise it with a message that says what is wrong and, where possible, what to do.
    """
