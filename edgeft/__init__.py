"""edgeft: fine-tune, merge, export and verify small language models for edge inference.

Importing this package is cheap: torch, transformers and the other heavy back-ends are
imported inside the functions that use them, so ``edgeft --help`` is fast and the
``runtime`` package works on a machine without torch.
"""

__version__ = "0.1.0"
