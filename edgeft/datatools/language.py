"""Language identification for ``edgeft data clean --language``: py3langid's bundled model (offline;
140 labels, 114 of them ISO 639-1 codes, which are what ``--language`` accepts), with probabilities
normalised over all its languages, so ``--min-language-confidence`` is a probability.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_CODE = re.compile(r"[a-z]{2}")  # ISO 639-1


@lru_cache(maxsize=1)
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    """The ISO 639-1 codes the model can tell apart."""
    return [code for code in _identifier().labels if _CODE.fullmatch(code)]


def language_problems(codes: tuple[str, ...], min_confidence: float) -> list[str]:
    """What is wrong with ``--language`` / ``--min-language-confidence`` (empty when nothing is)."""
    problems = []
    if not 0 <= min_confidence <= 1:
        problems.append("--min-language-confidence must be in [0, 1]")
    if codes:
        known = set(known_languages())
        unknown = [c for c in codes if c not in known]
        if unknown:
            problems.append(f"--language: unknown ISO 639-1 code(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
    return problems


class LanguageFilter:
    """Keeps rows whose most probable language is one of ``codes`` with at least ``min_confidence``."""

    def __init__(self, codes: tuple[str, ...], min_confidence: float):
        self.codes, self.min_confidence = frozenset(codes), min_confidence

    def detect(self, text: str) -> tuple[str, float]:
        """(language code, probability) of the text's most probable language."""
        language, probability = _identifier().classify(text)
        return language, float(probability)

    def rejects(self, text: str) -> str | None:
        """Why the row is dropped (what was detected), or None when it is kept."""
        language, probability = self.detect(text)
        if language in self.codes and probability >= self.min_confidence:
            return None
        return f"detected {language} ({probability:.2f})"
