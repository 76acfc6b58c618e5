"""How much of a constitution's own wording a model's answers carry: the share of answer words that are
the constitution's distinctive words (its words less the teacher prompt's frame, stock answer wording and
common function words). A model that learned only a persona's *shape* (first-person trait statements in
any words) scores near 0; one that learned *this* persona uses its nouns and adjectives.
"""

from __future__ import annotations

import re

from character.persona.constitution import Constitution

# Function words and first-person scaffolding every persona shares.
COMMON = frozenset(
    """
    i me my mine am is are was be been it its a an the of in on at to for from by with as and or but if
    then than so that this these those they them their you your we our when where while like every each
    all any some very more most can will would do does not no yes have has had about into over how what
    """.split()
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z'-]*[a-z]|[a-z]", text.lower())


def distinctive_words(constitution: Constitution, *exclude: str) -> frozenset[str]:
    """The constitution's trait words, less COMMON and the words of every text in `exclude` (say, the
    teacher prompt's frame and the base model's plain answers)."""
    own = {w for t in constitution.traits for w in words(t.trait)}
    shared = {w for text in exclude for w in words(text)}
    return frozenset(own - shared - COMMON)


def word_rate(answers: list[str], vocabulary: frozenset[str]) -> tuple[float, int]:
    """(share of the answers' words in `vocabulary`, number of words)."""
    ws = [w for a in answers for w in words(a)]
    return (sum(w in vocabulary for w in ws) / len(ws) if ws else 0.0), len(ws)
