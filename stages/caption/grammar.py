"""FaceCaption-15M's first step: a probabilistic grammar that turns confident attributes into text.

One sentence per attribute group (elementary, facial features, hairstyle, beard, accessories),
plus expression and pose when known. Every choice (which phrasing, which order, which synonym)
is drawn from a random generator seeded by the row's key, so a row always gets the same caption
and different rows read differently. Only attributes in ``confident_attributes`` are ever named;
pronouns follow the gender presentation, or stay neutral ("they") when it is unknown.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from facecap.stages.shared.values import missing

# Noun phrases for "has ..." sentences (None: the attribute is said another way).
FEATURES = {
    "Arched_Eyebrows": ("arched eyebrows", "nicely arched brows"),
    "Bags_Under_Eyes": ("bags under the eyes", "slight bags under the eyes"),
    "Big_Lips": ("full lips", "big lips"),
    "Big_Nose": ("a big nose", "a prominent nose"),
    "Bushy_Eyebrows": ("bushy eyebrows", "thick eyebrows"),
    "Chubby": ("a chubby face", "round, full cheeks"),
    "Double_Chin": ("a double chin",),
    "High_Cheekbones": ("high cheekbones", "pronounced cheekbones"),
    "Narrow_Eyes": ("narrow eyes", "narrow-set eyes"),
    "Oval_Face": ("an oval face", "an oval-shaped face"),
    "Pale_Skin": ("pale skin", "a fair complexion"),
    "Pointy_Nose": ("a pointy nose", "a pointed nose"),
    "Rosy_Cheeks": ("rosy cheeks", "flushed cheeks"),
    "Mouth_Slightly_Open": ("a slightly open mouth", "parted lips"),
}
HAIR_COLOURS = {"Black_Hair": "black", "Blond_Hair": "blond", "Brown_Hair": "brown", "Gray_Hair": "gray"}
HAIR_TEXTURES = {"Straight_Hair": "straight", "Wavy_Hair": "wavy"}
BEARD = {
    "5_o_Clock_Shadow": ("a five o'clock shadow", "light stubble"),
    "Goatee": ("a goatee",),
    "Mustache": ("a mustache", "a moustache"),
    "Sideburns": ("sideburns", "long sideburns"),
}
ACCESSORIES = {
    "Eyeglasses": ("eyeglasses", "glasses", "a pair of glasses"),
    "Wearing_Hat": ("a hat",),
    "Wearing_Earrings": ("earrings",),
    "Wearing_Necklace": ("a necklace",),
    "Wearing_Necktie": ("a necktie", "a tie"),
    "Wearing_Lipstick": ("lipstick",),
    "Heavy_Makeup": ("heavy makeup", "noticeable makeup"),
}
EXPRESSIONS = {
    "happy": ("looks happy", "has a happy expression"),
    "sad": ("looks sad", "has a sad expression"),
    "angry": ("looks angry", "has an angry expression"),
    "surprise": ("looks surprised", "has a surprised expression"),
    "fear": ("looks afraid", "has a fearful expression"),
    "disgust": ("looks disgusted",),
    "neutral": ("has a neutral expression", "looks calm"),
}
POSES = {
    "frontal": ("faces the camera", "looks straight at the camera"),
    "left_three_quarter": ("is turned slightly to the left",),
    "right_three_quarter": ("is turned slightly to the right",),
    "left_profile": ("is seen in profile, facing left",),
    "right_profile": ("is seen in profile, facing right",),
}


@dataclass(frozen=True)
class Person:
    """How to refer to the face: noun phrases and a pronoun with its verb forms."""

    nouns: tuple[str, ...]
    pronoun: str
    has: str
    is_: str
    possessive: str


WOMAN = Person(("the woman", "this woman", "the lady"), "she", "has", "is", "her")
MAN = Person(("the man", "this man", "the gentleman"), "he", "has", "is", "his")
ANYONE = Person(("this person", "the person", "the individual"), "they", "have", "are", "their")


def seeded(key: str, seed: int, salt: str = "") -> random.Random:
    digest = hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return f"{', '.join(items[:-1])}, and {items[-1]}"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


class Grammar:
    """Captions for one row: ``caption(values, key, variant)``; values hold the tag stage's columns."""

    def __init__(self, seed: int = 0, min_gender_score: float = 0.9, min_emotion_score: float = 0.6):
        self.seed = seed
        self.min_gender_score = min_gender_score
        self.min_emotion_score = min_emotion_score

    def person(self, values: dict[str, Any]) -> Person:
        gender, score = values.get("gender"), values.get("gender_score")
        confident = score is None or missing(score) or float(score) >= self.min_gender_score
        if gender == "female" and confident:
            return WOMAN
        if gender == "male" and confident:
            return MAN
        return ANYONE

    def caption(self, values: dict[str, Any], key: str, variant: int = 0) -> str:
        rng = seeded(key, self.seed, str(variant))
        confident = confident_set(values)
        who = self.person(values)
        sentences = [self._elementary(who, values, confident, rng)]
        for group in (self._features, self._hair, self._beard, self._accessories, self._expression, self._pose):
            sentence = group(who, values, confident, rng)
            if sentence:
                sentences.append(sentence)
        head, rest = sentences[0], sentences[1:]
        rng.shuffle(rest)  # the order of the groups varies too, after the opening sentence
        return " ".join(capitalise(s) for s in [head, *rest])

    def short(self, values: dict[str, Any], key: str) -> str:
        """One sentence: who, and the most telling group."""
        rng = seeded(key, self.seed, "short")
        confident = confident_set(values)
        return capitalise(self._elementary(self.person(values), values, confident, rng))

    # -- groups -----------------------------------------------------------------------------
    def _elementary(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str:
        age = _age_word(values)
        if who is ANYONE:
            subject = {
                "young": "a young person",
                "middle-aged": "a middle-aged person",
                "older": "an older person",
            }.get(age or "", "a person")
        else:
            noun = "woman" if who is WOMAN else "man"
            if "Young" in confident and not age:
                age = "young"
            subject = f"{article(age)} {age} {noun}" if age else f"{article(noun)} {noun}"
        openings = (f"this photo shows {subject}", f"the face of {subject}", f"a close-up of {subject}")
        sentence = rng.choice(openings)
        if "Attractive" in confident:
            sentence += rng.choice((" who is attractive", " with attractive features"))
        if "Smiling" in confident:
            sentence += rng.choice((", smiling", " who is smiling"))
        return sentence + "."

    def _features(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str | None:
        phrases = [rng.choice(FEATURES[a]) for a in FEATURES if a in confident]
        if not phrases:
            return None
        rng.shuffle(phrases)
        subject = rng.choice((who.pronoun, *who.nouns))
        return f"{subject} {who.has} {join(phrases)}."

    def _hair(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str | None:
        if "Bald" in confident:
            return f"{who.pronoun} {who.is_} bald."
        colour = next((c for a, c in HAIR_COLOURS.items() if a in confident), None)
        texture = next((t for a, t in HAIR_TEXTURES.items() if a in confident), None)
        parts = []
        if colour or texture:
            words = " ".join(w for w in (texture, colour) if w)
            parts.append(f"{words} hair")
        if "Bangs" in confident:
            parts.append("bangs")
        if "Receding_Hairline" in confident:
            parts.append("a receding hairline")
        if not parts:
            return None
        verb = rng.choice((f"{who.has}", "sports" if who is not ANYONE else "sport"))
        return f"{who.pronoun} {verb} {join(parts)}."

    def _beard(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str | None:
        phrases = [rng.choice(BEARD[a]) for a in BEARD if a in confident]
        if phrases:
            return f"{who.pronoun} {who.has} {join(phrases)}."
        if "No_Beard" in confident and who is MAN:
            return rng.choice(("he is clean-shaven.", "he has no beard."))
        return None

    def _accessories(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str | None:
        phrases = [rng.choice(ACCESSORIES[a]) for a in ACCESSORIES if a in confident]
        if not phrases:
            return None
        return f"{who.pronoun} {who.is_} wearing {join(phrases)}."

    def _expression(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str | None:
        emotion, score = values.get("emotion"), values.get("emotion_score")
        if not emotion or emotion not in EXPRESSIONS or missing(score) or float(score) < self.min_emotion_score:
            return None
        phrase = rng.choice(EXPRESSIONS[emotion])
        if who is ANYONE:
            phrase = phrase.replace("looks", "look").replace("has", "have", 1)
        return f"{who.pronoun} {phrase}."

    def _pose(self, who: Person, values: dict, confident: set[str], rng: random.Random) -> str | None:
        pose = values.get("pose_bin")
        if not pose or pose not in POSES:
            return None
        phrase = rng.choice(POSES[pose])
        if who is ANYONE:
            phrase = phrase.replace("faces", "face", 1).replace("looks", "look", 1).replace("is ", "are ", 1)
        return f"{who.pronoun} {phrase}."


def confident_set(values: dict[str, Any]) -> set[str]:
    """The row's confident attributes (a list, or the array Parquet gives back; None when untagged)."""
    found = values.get("confident_attributes")
    return set() if found is None or (isinstance(found, float) and math.isnan(found)) else {str(a) for a in found}


def _age_word(values: dict) -> str | None:
    age, spread = values.get("age"), values.get("age_std")
    if missing(age):
        return None
    if not missing(spread) and float(spread) > 15:
        return None  # too unsure to say
    age = float(age)
    if age < 30:
        return "young"
    return "middle-aged" if age < 55 else "older"
