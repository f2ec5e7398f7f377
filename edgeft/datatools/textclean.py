"""Pure text cleaning and quality measures for ``edgeft data clean`` (no I/O): Unicode normalisation,
HTML removal, control characters, whitespace; repetition and symbol ratios; the normalised key that
exact deduplication compares.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from html.parser import HTMLParser

NORMAL_FORMS = ("NFKC", "NFC", "none")
# Characters removed: C0/C1 controls except tab and newline, zero-width and byte-order marks.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_LOOKS_HTML = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>|<!--|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")
_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "ul", "ol", "table"}
_SKIP_TAGS = {"script", "style"}
_SPACES = re.compile(r"[^\S\n]+")
_SPACE_BEFORE_NEWLINE = re.compile(r" *\n *")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")
_WHITESPACE = re.compile(r"\s")
_SYMBOL = re.compile(r"[^\w\s.,;:!?'\"()-]|_")  # neither a letter, digit, space nor common punctuation


class _TextOfHtml(HTMLParser):
    """Collects the text of an HTML fragment: tags dropped, entities decoded, script/style skipped,
    block tags turned into line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP_TAGS:
            self._skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """The text of an HTML fragment (unchanged when it has no tags or entities)."""
    if not _LOOKS_HTML.search(text):
        return text
    parser = _TextOfHtml()
    parser.feed(text)
    parser.close()
    return html.unescape("".join(parser.parts))


def normalise_whitespace(text: str) -> str:
    """Runs of spaces/tabs become one space, spaces around line breaks go, at most one blank line."""
    text = _SPACES.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _BLANK_LINES.sub("\n\n", _SPACE_BEFORE_NEWLINE.sub("\n", text)).strip()


def clean_text(text: str, *, normal_form: str = "NFKC", html_: bool = True) -> tuple[str, list[str]]:
    """The cleaned text and what changed it, in order ("unicode normalised", "html stripped",
    "control characters removed", "whitespace normalised")."""
    fixes = []
    steps = [("unicode normalised", (lambda t: unicodedata.normalize(normal_form, t)) if normal_form != "none" else None),
             ("html stripped", strip_html if html_ else None),
             ("control characters removed", lambda t: _CONTROL.sub("", t)),
             ("whitespace normalised", normalise_whitespace)]
    for name, step in steps:
        if step is None:
            continue
        new = step(text)
        if new != text:
            fixes.append(name)
            text = new
    return text, fixes


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word ``n``-grams that repeat an earlier one (0 for texts under 10 words)."""
    words = _WORD.findall(text.lower())
    if len(words) < 10:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are neither letters, digits nor common punctuation."""
    visible = len(text) - len(_WHITESPACE.findall(text))
    return len(_SYMBOL.findall(text)) / visible if visible else 0.0


def dedup_text(text: str) -> str:
    """The form exact deduplication compares: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_key(text: str) -> bytes:
    """A 16-byte digest of ``dedup_text(text)`` (what the exact-duplicate index stores)."""
    return hashlib.blake2b(dedup_text(text).encode("utf-8"), digest_size=16).digest()
