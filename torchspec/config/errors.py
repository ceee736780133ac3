class ConfigError(ValueError):
    """A user-caused configuration error; its message is one line naming the key and source."""


class FileError(ConfigError):
    """A file or directory the run reads or writes cannot be used (permissions, disk space, corrupt content):
    user-fixable, one line naming the path."""
