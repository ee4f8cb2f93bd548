"""The project's one-line errors (each message names the thing and the fix; entry points print it and exit 1)."""


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the source, the key and the fix."""


class RunError(ValueError):
    """A run cannot start or go on (missing or mismatched inputs, a full disk); one line with the fix."""
