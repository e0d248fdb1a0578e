"""Errors the command line turns into one-line messages."""


class InputError(ValueError):
    """Bad user input (unknown name, bad flag, unusable data or model): exit code 2, raised before loading weights."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped and kept its last good checkpoint."""
