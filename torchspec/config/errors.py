class ConfigError(ValueError):
    """A user-caused configuration error; its message is one line naming the key and source."""
