"""Sinks: where a finished audit goes and how it is told.

* :mod:`.logdir`: the log directory (layout, permissions, atomic private writes);
* :mod:`.audit_log`: the append-only ``audit.jsonl``;
* :mod:`.tensorboard`: scalars, images and text for TensorBoard;
* :mod:`.summary`: the run summary and the verdict;
* :mod:`.report`: ``report.json``/``report.html`` and the comparison page across runs.
"""
