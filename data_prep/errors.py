"""The one error type for bad user input."""


class InputError(ValueError):
    """Bad input (a file, record or setting): the CLI prints it as one line, without a traceback, and exits 2."""
