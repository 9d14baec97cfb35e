"""Error types that the command line turns into exit statuses."""


class UsageError(ValueError):
    """Bad user input: the CLI prints it as one line and exits with status 2.

    Raise it before any work starts (no MLflow run may exist yet), with a message that says what
    is wrong and what is accepted.
    """
