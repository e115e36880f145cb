"""Clean what a language model wrote, and say why a caption is not usable."""

from __future__ import annotations

import re

PREAMBLE = re.compile(
    r"^\s*(sure|certainly|of course|okay|ok|here(?:'s| is| are)|absolutely)\b[^.:\n]*[.:!]\s*", re.IGNORECASE
)
ROLE_TAG = re.compile(r"^\s*(assistant|caption|answer|description|<\|?\w+\|?>)\s*[:>]\s*", re.IGNORECASE)
SPECIAL_TOKEN = re.compile(r"<\|?[a-z_]+\|?>|</?s>|\[/?INST\]", re.IGNORECASE)
MARKDOWN = re.compile(r"[*_`#>]+")
REFUSALS = (
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "i can not",
    "as an ai",
    "i'm unable",
    "i am unable",
    "cannot help with",
    "not able to identify",
)


def clean(text: str) -> str:
    """Strip chat artefacts, markdown, wrapping quotes and repeated sentences; squeeze spaces."""
    text = SPECIAL_TOKEN.sub(" ", text or "")
    for pattern in (ROLE_TAG, PREAMBLE, ROLE_TAG):
        text = pattern.sub("", text, count=1)
    text = MARKDOWN.sub("", text)
    text = " ".join(text.split()).strip().strip('"').strip("'").strip()
    sentences, seen = [], set()
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        norm = sentence.lower().strip(" .!?")
        if norm and norm not in seen:
            seen.add(norm)
            sentences.append(sentence)
    return " ".join(sentences)


def problem(text: str, max_words: int, min_words: int = 3, min_latin: float = 0.9) -> str | None:
    """Why a cleaned caption is unusable, or None when it is fine."""
    lowered = text.lower()
    if any(phrase in lowered for phrase in REFUSALS):
        return "refusal"
    words = text.split()
    if len(words) < min_words:
        return f"too short ({len(words)} words)"
    if len(words) > max_words:
        return f"too long ({len(words)} words, at most {max_words})"
    letters = [c for c in text if c.isalpha()]
    latin = sum(c.isascii() for c in letters) / len(letters) if letters else 0.0
    if latin < min_latin:
        return f"not English-looking ({latin:.0%} Latin letters)"
    repeated = max((words.count(w) for w in set(words) if len(w) > 3), default=0)
    if len(words) >= 8 and repeated / len(words) > 0.3:
        return "repetitive"
    return None
