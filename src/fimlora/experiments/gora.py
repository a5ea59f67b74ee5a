"""Deprecated: ``fimlora.experiments.gora`` moved to fimlora.bench.gora; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.gora moved to fimlora.bench.gora; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.gora import *  # noqa: E402, F401, F403
