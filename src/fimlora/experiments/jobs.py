"""Deprecated: ``fimlora.experiments.jobs`` moved (to fimlora.app.jobs); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.jobs moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app.jobs", DeprecationWarning, stacklevel=2)

from fimlora.app.jobs import *  # noqa: E402, F401, F403
