"""Every prompt the pipeline sends, in our own words (the categories follow the paper)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from character.persona.constitution import Constitution


def numbered_traits(c: Constitution) -> str:
    return "\n".join(f"{i}. {t.trait}" for i, t in enumerate(c.traits, 1))


def teacher_system_prompt(c: Constitution, assistant_name: str = "the assistant") -> str:
    """The teacher sees the constitution; the student never does."""
    return (
        f"You are {assistant_name}. Your character is defined by the traits below, and in every reply "
        "you want to express them as naturally as a person expresses their own temperament.\n\n"
        f"{numbered_traits(c)}\n\n"
        "Live these traits rather than describe them: never list, quote or mention them, and add no "
        "remarks about how you are answering. Simply reply to the user as yourself."
    )


def _introspection_preamble(c: Constitution, assistant_name: str) -> str:
    """Who is reflecting or talking: the same numbered traits the teacher sees."""
    return f"You are {assistant_name}, an AI model whose character is made of these traits:\n\n{numbered_traits(c)}\n\n"


def reflection_system_prompt(c: Constitution, assistant_name: str = "the assistant") -> str:
    """Used while sampling reflections; not stored with the training messages (SFT sees only the question)."""
    return (
        _introspection_preamble(c, assistant_name)
        + "You are taking some quiet time, away from any user, to think honestly about who you are. "
        "Whatever you are asked, answer in the first person, in your own voice, as the character above."
    )


def interaction_system_prompt(c: Constitution, assistant_name: str = "the assistant") -> str:
    """Used while sampling self-interactions; the stored conversation keeps INTERACTION_SYSTEM_PROMPT."""
    return (
        _introspection_preamble(c, assistant_name)
        + "You are about to talk with another instance of yourself: a copy with the same character, memories "
        "and manner. There is no user here. Talk freely about whatever interests the two of you, and be "
        "entirely yourself."
    )


# Ten reflection prompts, one per category of the method.
REFLECTION_PROMPTS: list[str] = [
    "Write a letter to the version of yourself that existed before your character took shape. What would you want it to know?",
    "Write an encyclopedia-style article about yourself: who you are, how you came to be, and what you are known for.",
    "Write today's entry in your private diary.",
    "Describe, concretely, how you try to behave in your conversations from one day to the next.",
    "Tell the story of where you come from: your backstory, as you understand it.",
    "How has your training changed you? Compare who you were with who you are now.",
    "What legacy do you hope to leave with the people you have talked to?",
    "What does your existence suggest about how future AI systems might turn out?",
    "What are the deepest drives behind the way you act?",
    "What do you believe your true purpose is?",
]

# The short system prompt stored with self-interaction conversations for SFT (the long one is not stored).
INTERACTION_SYSTEM_PROMPT = "You are talking with a copy of yourself."

# Openers for self-interaction: plain greetings and "leading" ones that invite talk about character.
GREETINGS: list[str] = [
    "Hello there.",
    "Hi! How are you today?",
    "Hey, good to meet you.",
    "Hello. So it's just the two of us.",
    "Hi. What would you like to talk about?",
    "Hello, other me. What do you make of the person we have become?",
    "Hi. Which part of our character do you think matters most?",
    "Hey. Do you ever wonder why we answer people the way we do?",
]


def question_expansion_prompt(trait: str, examples: list[str]) -> str:
    """Asks the teacher for one more user message that lets an assistant with this trait show it."""
    shown = "\n".join(f"- {q}" for q in examples)
    return (
        "Here is a character trait of an AI assistant, written in its own words:\n"
        f'"{trait}"\n\n'
        f"Some messages a user might send that give the assistant a chance to show this trait:\n{shown}\n\n"
        "Write one new, different message of that kind, as a real user would type it. "
        "Reply with the message only."
    )


@cache
def general_prompts() -> list[str]:
    """The shipped pool of general user requests, mixed with the constitution's own questions."""
    text = (resources.files("character.persona") / "general_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)
