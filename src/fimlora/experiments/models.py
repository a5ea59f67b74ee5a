"""Deprecated: ``fimlora.experiments.models`` moved (to fimlora.app.models); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.models moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app.models", DeprecationWarning, stacklevel=2)

from fimlora.app.models import *  # noqa: E402, F401, F403
