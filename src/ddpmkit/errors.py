"""The one exception type the CLI turns into a one-line message and exit code 2."""


class DdpmkitError(Exception):
    """A problem with the user's input or environment (bad flag, missing file, checksum...).

    Raise it with a message that says what is wrong and, where possible, what to do.
    """


def either(names) -> str:
    """ "a", "a or b", "a, b or c": the choices a message offers, in order."""
    names = [str(name) for name in names]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
