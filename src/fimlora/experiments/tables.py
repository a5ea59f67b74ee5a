"""Deprecated: ``fimlora.experiments.tables`` moved to fimlora.bench.tables; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.tables moved to fimlora.bench.tables; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.tables import *  # noqa: E402, F401, F403
