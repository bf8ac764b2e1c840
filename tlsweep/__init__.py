"""tlsweep: transfer-learning sweeps on cached backbone features.

Images -> features (cached once per backbone) -> trials (Optuna) -> runs (MLflow) -> the winner.
"""

from __future__ import annotations

from tlsweep.config import SweepConfig, load_sweep
from tlsweep.errors import TlsweepError
from tlsweep.versions import __version__

__all__ = ["SweepConfig", "TlsweepError", "load_sweep", "__version__"]
