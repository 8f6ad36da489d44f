"""One exception type for every mistake a user can make, so the CLI can turn it into exit 2."""


class UsageError(ValueError):
    """Bad input from a user: an argument, a file or an expression. Message is one line."""
