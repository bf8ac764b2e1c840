"""tlsweep: transfer-learning sweeps on cached backbone features.

Images -> features (cached once per backbone) -> trials (Optuna) -> runs (MLflow) -> the winner.
"""

from __future__ import annotations

from tlsweep._version import __version__
from tlsweep.config import SweepConfig
from tlsweep.errors import TlsweepError
from tlsweep.sweepfile import load_sweep

__all__ = ["SweepConfig", "TlsweepError", "load_sweep", "__version__"]
