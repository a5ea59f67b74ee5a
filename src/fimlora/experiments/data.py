"""Deprecated: ``fimlora.experiments.data`` moved (to fimlora.app.tasks, .user_files, .hf, .collators, .scoring
and fimlora.bench.tasks); this path still imports what moved, with a DeprecationWarning, for one release."""

import warnings

warnings.warn("fimlora.experiments.data moved to the app and bench layers (fimlora.app, fimlora.bench); "
              "import from fimlora.app", DeprecationWarning, stacklevel=2)

from fimlora.app.collators import *  # noqa: E402, F401, F403
from fimlora.app.hf import *  # noqa: E402, F401, F403
from fimlora.app.scoring import *  # noqa: E402, F401, F403
from fimlora.app.tasks import *  # noqa: E402, F401, F403
from fimlora.app.user_files import *  # noqa: E402, F401, F403
from fimlora.bench.tasks import *  # noqa: E402, F401, F403
