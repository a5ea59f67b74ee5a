"""Deprecated: ``fimlora.experiments.verdicts`` moved to fimlora.bench.verdicts; this path still imports what moved,
with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.verdicts moved to fimlora.bench.verdicts; import it from there", DeprecationWarning,
              stacklevel=2)

from fimlora.bench.verdicts import *  # noqa: E402, F401, F403
