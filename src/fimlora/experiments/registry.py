"""Deprecated: ``fimlora.experiments.registry`` moved to fimlora.bench.registry; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.registry moved to fimlora.bench.registry; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.registry import *  # noqa: E402, F401, F403
