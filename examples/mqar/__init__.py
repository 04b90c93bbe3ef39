"""MQAR (multi-query associative recall) with BLA and sliding-window attention layers: ``data`` (the task),
``model`` (the small language model and its attention layers), ``train`` (one run), ``sweep`` (the command
line: runs over state sizes and seeds, a resumable JSON), ``plot`` (the PNG). Run ``python -m examples.mqar
--help`` from the repository root."""
