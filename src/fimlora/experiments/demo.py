"""Deprecated: ``fimlora.experiments.demo`` moved (to fimlora.app.demo); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.demo moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app.demo", DeprecationWarning, stacklevel=2)

from fimlora.app.demo import *  # noqa: E402, F401, F403
