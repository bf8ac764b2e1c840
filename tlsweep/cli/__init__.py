"""The command line: flags, progress display and exit codes; the only place that prints.

Holds no logic and no defaults of its own: it reads the config's and calls the library.
"""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
