"""Error hierarchy of vectorgeo.

Every error raised on bad input derives from :class:`VectorgeoError` and names
the config key, file path or request parameter at fault, so that a message can
be shown to the user as it is.
"""

from __future__ import annotations


class VectorgeoError(Exception):
    """Root of all vectorgeo errors."""


class ConfigError(VectorgeoError):
    """A configuration value is missing, of the wrong type or out of range.

    Attributes:
        key: Dotted path of the config key at fault, e.g. ``sample.patch_px``.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class RasterError(VectorgeoError):
    """A raster source is missing, unreadable or unsuitable.

    Attributes:
        path: The file, URL or built-in name at fault.
        key: Dotted path of the config key that names the raster (e.g. ``layers.elevation.source``), or None.
    """

    def __init__(self, path: str, message: str, key: str | None = None) -> None:
        self.path = path
        self.key = key
        where = f" (config key '{key}')" if key else ""
        super().__init__(f"raster '{path}'{where}: {message}")


class DataError(VectorgeoError):
    """A data file (shard, parquet, model) is malformed or inconsistent.

    Attributes:
        path: The file at fault.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class DatabaseError(VectorgeoError):
    """The database is unreachable or refused an operation.

    ``str(error)`` is ``message`` followed by the driver's ``detail`` (for logs and the command line);
    the API shows only ``message``, never driver text.

    Attributes:
        message: What failed, in words fit to show to any client.
        detail: The driver's own message, or None.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        self.message = message
        self.detail = detail
        super().__init__(f"{message}: {detail}" if detail else message)


class QueryTimeout(DatabaseError):
    """A query ran longer than the statement timeout and was cancelled by the server."""


class RequestError(VectorgeoError):
    """An API request parameter is invalid.

    Attributes:
        param: Name of the parameter at fault.
    """

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"parameter '{param}': {message}")
