"""Errors meant for people: one line naming the config key or path and what was expected."""


class FdpipeError(Exception):
    """Base class; its message is shown to the user as-is."""


class ConfigError(FdpipeError):
    """A config value is missing or out of range. Message: `config key 'a.b': expected ..., got ...`."""

    def __init__(self, key: str, expected: str, got=None):
        self.key = key
        msg = f"config key '{key}': expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)


class DataError(FdpipeError):
    """An input file is missing, unreadable, malformed or empty. Message names the path."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")
