"""vmctl: the command-line tool for vmagent (developers and scripts)."""

from vmagent import __version__

__all__ = ["__version__"]
