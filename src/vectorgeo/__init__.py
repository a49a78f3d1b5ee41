"""vectorgeo: an embedding vector for every land location on Earth."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vectorgeo")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
