"""Deprecated: ``fimlora.experiments.metrics`` moved (to fimlora.app.metrics); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.metrics moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app.metrics", DeprecationWarning, stacklevel=2)

from fimlora.app.metrics import *  # noqa: E402, F401, F403
