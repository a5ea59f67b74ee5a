"""Deprecated: ``fimlora.experiments.train`` moved (to fimlora.app.train); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.train moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app.train", DeprecationWarning, stacklevel=2)

from fimlora.app.train import *  # noqa: E402, F401, F403
