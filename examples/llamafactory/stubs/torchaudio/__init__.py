"""An empty stand-in for torchaudio, for text-only LLaMA-Factory training (docs/llamafactory.md).

llamafactory 0.9.5 imports torchaudio at start-up (``llamafactory/data/mm_plugin.py``), and no torchaudio release
loads against torch 2.13. Text-only training never calls it. Put the folder holding this package on PYTHONPATH
(``PYTHONPATH=examples/llamafactory/stubs``); do not use it for audio data.
"""
