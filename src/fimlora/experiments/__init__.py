"""Deprecated: the research harness moved into two layers, :mod:`fimlora.app` (what the ``fimlora`` command
needs: jobs, builders, models, training, data) and :mod:`fimlora.bench` (methods, sweeps, reports). Each old module
path here imports its new home with a DeprecationWarning, for one release.
"""
