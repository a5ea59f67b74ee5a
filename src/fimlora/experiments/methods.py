"""Deprecated: ``fimlora.experiments.methods`` moved to fimlora.bench.methods; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.methods moved to fimlora.bench.methods; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.methods import *  # noqa: E402, F401, F403
