"""Deprecated: ``fimlora.experiments.significance`` moved (to fimlora.bench.significance); this path still imports
what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.significance moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.bench.significance", DeprecationWarning, stacklevel=2)

from fimlora.bench.significance import *  # noqa: E402, F401, F403
