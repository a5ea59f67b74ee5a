"""Deprecated: ``fimlora.experiments.report`` moved to fimlora.bench.report; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.report moved to fimlora.bench.report; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.report import *  # noqa: E402, F401, F403
