"""kvmlab's version: a leaf module (it imports nothing of kvmlab), so the CLI
and doctor can read it without importing the package's API."""

from importlib import metadata as _metadata

try:
    #: The installed distribution's version (pyproject.toml is its one source).
    __version__: str = _metadata.version("kvmlab")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
