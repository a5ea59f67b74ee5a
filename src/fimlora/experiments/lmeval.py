"""Deprecated: ``fimlora.experiments.lmeval`` moved (to fimlora.bench.lmeval); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.lmeval moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.bench.lmeval", DeprecationWarning, stacklevel=2)

from fimlora.bench.lmeval import *  # noqa: E402, F401, F403
