"""Deprecated: ``fimlora.experiments.builders`` moved (to fimlora.app.builders); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.builders moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app.builders", DeprecationWarning, stacklevel=2)

from fimlora.app.builders import *  # noqa: E402, F401, F403
