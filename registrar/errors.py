"""The one error type that ends the program: status 1 and one line on stderr."""


class FatalError(Exception):
    """A runtime error that ends the program with status 1 and one line."""
