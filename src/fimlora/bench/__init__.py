"""The research bench: FIM-LoRA against its peers, over tasks, seeds and sizes (``fimlora run``/``report``).

Methods and their registry, experiment configs, sweeps, reports and significance tests, lm-eval, and the
bundled tasks (:mod:`.tasks`), which register into the command's task registry. It builds on the application
layer (:mod:`fimlora.app`) and the library; neither imports it. Its optional needs (PyYAML, matplotlib, pyarrow,
gguf) are imported where they are used; install them with ``pip install 'fimlora[experiments]'``.
"""
