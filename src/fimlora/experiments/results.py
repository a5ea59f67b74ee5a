"""Deprecated: ``fimlora.experiments.results`` moved to fimlora.bench.results; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.results moved to fimlora.bench.results; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.results import *  # noqa: E402, F401, F403
