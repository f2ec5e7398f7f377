"""Answers compared as text: the normalisation every exact-match score uses."""

from __future__ import annotations

import re


def normalise_answer(text: str) -> str:
    """Lower-case, keep letters, digits and spaces, collapse whitespace."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())
