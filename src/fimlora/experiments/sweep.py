"""Deprecated: ``fimlora.experiments.sweep`` moved to fimlora.bench.sweep; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.sweep moved to fimlora.bench.sweep; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.sweep import *  # noqa: E402, F401, F403
