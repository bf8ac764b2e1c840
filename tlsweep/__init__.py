"""tlsweep: transfer-learning sweeps on cached backbone features.

Images -> features (cached once per backbone) -> trials (Optuna) -> runs (MLflow) -> the winner.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from tlsweep.config import SweepConfig, load_sweep
from tlsweep.errors import TlsweepError

__all__ = ["SweepConfig", "TlsweepError", "load_sweep", "__version__"]
try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("tlsweep")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
