"""Deprecated: ``fimlora.experiments.config`` moved to fimlora.bench.config; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.config moved to fimlora.bench.config; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.config import *  # noqa: E402, F401, F403
