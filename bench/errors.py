"""Errors that the CLI turns into one clear line and exit code 2."""


class LoopscopeError(Exception):
    """Unusable input: the message names the file, key and value, and what to do."""


class ConfigError(LoopscopeError):
    """A profile, corpus or option that cannot be used as given."""
