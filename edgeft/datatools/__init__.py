"""``edgeft data``: streaming data preparation (stats, convert, clean, split), each command writing a
report (JSON and Markdown) and never modifying its input.

Modules: ``stream`` (reading rows, text fields per schema), ``writer`` (atomic JSON Lines output),
``report`` (the report), ``textclean`` (pure cleaning and quality measures), ``dedup`` (exact and
MinHash-LSH near-duplicate indexes, on disk), ``language`` (language identification for ``clean``),
``tokens`` (token counts as training sees them), one module per command (``stats``, ``convert``,
``clean``, ``split``) and ``cli`` (the Click group).
"""
