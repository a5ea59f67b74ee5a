"""The ``fimlora`` command's application layer: what calibrate, check, export and demo need beyond the library.

Jobs (:mod:`.jobs`, :mod:`.demo`), model and adapter builders (:mod:`.builders`, :mod:`.models`), training and
evaluation (:mod:`.train`, :mod:`.scoring`, :mod:`.metrics`) and data: the task registry (:mod:`.tasks`), a
user's own files (:mod:`.user_files`), the hub (:mod:`.hf`) and the collators (:mod:`.collators`). It builds on
the library (``fimlora``), which never imports it, and never imports the research bench (:mod:`fimlora.bench`),
whose bundled tasks reach the registry through an entry point.
"""
