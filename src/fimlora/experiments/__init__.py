"""The research harness: offline models and data, fine-tuning, the five methods, sweeps and reports.

It builds on the library (``fimlora``) and is never imported by it. Its optional needs (PyYAML,
matplotlib, pyarrow, gguf) are imported where they are used; install them with
``pip install 'fimlora[experiments]'``.
"""
