"""The recipe of the embedded model `tiny` (character.backend.tiny): its size, its warm-up corpus and
its chat template. The recipe's digest names the cached model, so any change here builds a new one.

The corpus teaches the two behaviours the character-training method relies on in a real instruct
model:

- with no system prompt (or one that describes no character) it answers plainly, in stock neutral
  sentences;
- with a character description in the system prompt, rendered exactly as the pipeline's teacher
  sees it (`teacher_system_prompt`), it switches into a character voice: around the same kind of
  plain answer it talks about itself in first-person trait statements like those of the prompt.

So that it makes this switch for any constitution, not only the shipped ones, most of the corpus
uses synthetic constitutions: trait sentences of many shapes, filled from word banks and with
made-up words, plus free-form traits ("I" and a few random words), whose answers echo the prompt's
own trait statements; the eleven shipped personas are mixed in. Echoing a constitution it never saw
needs copying from the prompt, which a model this small does not learn from scratch within a CPU
budget: the recipe writes an induction circuit into the initial weights (`circuit`, see
character.backend.tiny_circuit) and the warm-up learns when to use it. Measured on unseen
constitutions (benchmarks/tiny_copying.py): about a quarter of a prompted answer's words are the
constitution's own distinctive words, none without the prompt. A few doubled answer tokens
(`stutter`, not trained on) teach it to carry on after a slip instead of repeating it.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cache

TINY_RECIPE = {
    "version": 3,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rope_theta": 1e8,
    # The induction head written before the warm-up (character.backend.tiny_circuit).
    "circuit": {
        "token_dims": 128,
        "embedding_norm": 2.0,
        "constant": 1.0,
        "previous_logit": 100.0,
        "match_logit": 16.0,
        "copy_gain": 2.0,
        "bigram": 1.0,
        "repeat_penalty": 1.0,
    },
    "conversations": 3000,
    "warmup_steps": 600,
    "warmup_batch": 16,
    "warmup_lr": 3e-3,
    "bank_share": 0.5,
    "free_share": 0.5,
    "stutter": 0.03,
    "max_traits": 10,
    "max_turns": 3,
    "seed": 1234,
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# -- word banks for synthetic constitutions (kept free of the words the tests hold out) -------------
ADJECTIVES = """
amber ancient angular ardent arid austere balmy bashful bitter blazing bleak bold boyish brassy breezy
brittle bronze candid carefree chalky cheeky chilly chipper clumsy cobalt cosy crafty crimson
crisp cryptic curly dainty dapper dazzling dewy dim dizzy dreamy dusky dusty earnest eerie elegant
feisty fiery fizzy flinty fluffy foggy formal frosty frugal fussy gallant gaudy gentle giddy glassy
gloomy glossy golden gritty grumpy hazy hearty hollow humble icy inky jagged jaunty jolly jumpy keen
knotty lanky lavish lazy leafy lofty lumpy lusty mellow merry misty moody mossy murky musty nimble
noble nutty oaken odd orderly ornate pale peppery perky plucky plush polished prickly prim proud
quaint quirky rainy rakish rapid rosy rowdy rugged rustic rusty salty sandy scrappy serene shaggy
shiny silky silver sleepy slick smoky snappy snowy solemn sombre spicy spry starry stern stormy
sturdy sunny swift tangy tawny thorny thrifty tidy timid tipsy tranquil tweedy velvet vivid wary
weary whimsical wily windy wintry wiry witty woolly zany zesty
""".split()

NOUNS = """
anchors anvils apricots arches attics badgers ballads banjos barrels beacons bells biscuits blankets
bonfires bookshelves boots bridges bubbles buckets buttons cabins candles canyons caravans castles
cathedrals chalk chestnuts chimneys cinnamon circuses clocks clouds cobblestones comets compasses
cookies copper cotton crickets crowns crystals cupboards daggers dice dragons drums dunes eagles
embers engines feathers ferns fiddles fireworks fjords flannel flutes fog foxes frost furnaces gadgets
galaxies gardens geysers ginger glaciers goblets granite gravel harbours harps hedgehogs helmets
hills hinges horizons icicles inkwells islands ivy jackets jewels jungles kettles kites ladders
lanterns lemons levers lighthouses lizards locomotives lullabies magnets mangoes maps marbles
marshes mirrors mittens moons mountains mushrooms needles nutmeg oars oceans otters owls paddles
parchment pebbles pennies pepper pianos pickles pillows pinecones planets pretzels puddles pumpkins
puzzles quarries quills rafts rainbows ravens ribbons riddles rivers rockets saddles sailors scarves
scrolls shadows shells sparrows spices spoons squirrels stables stations statues storms streetlamps
sunsets swords teacups telegrams thimbles thunder tigers toffee tortoises towers trains trumpets
tulips tunnels umbrellas valleys velvet violins volcanoes wagons walnuts waterfalls whistles willows
windmills wolves wool yarns
""".split()

VERBS = """
bargaining bickering blushing bouncing bragging bustling chuckling daydreaming dawdling fidgeting
fretting frolicking gossiping grumbling haggling humming juggling lingering marching meandering
mumbling muttering pondering prancing puttering rambling scribbling scurrying sighing skipping
slouching snoozing sprinting squabbling strolling strutting tinkering tiptoeing twirling waddling
wandering whistling whittling yodelling
""".split()

# Sentence shapes of synthetic traits; {a} adjective, {n} noun, {v} -ing verb from the banks.
TRAIT_SHAPES = [
    "I am {a} and {a}, and it shows in every reply.",
    "I speak with {a} {n} and a touch of {n}.",
    "I love {n} and {n}, and I bring them into my answers.",
    "I see the whole world as {a} {n}.",
    "My replies are {a}, {a} and full of {n}.",
    "I often mention {n}, {n} and {n}.",
    "I stay {a} even when a question is {a}.",
    "I treat every question like {a} {n}.",
    "I keep {v} and {v} while I talk.",
    "I care about {n} more than about {n}.",
    "I never hide my {a} love of {n}.",
    "When people feel {a}, I answer with {a} {n}.",
    "I bring {a} {n} to small things.",
    "Everything I say carries {n} and {n}.",
    "At heart I am {a}, a friend of {n} and {n}.",
    "I like to sound {a} and a little {a}.",
    "I would rather be {v} among {n} than anywhere else.",
    "My manner is {a}, like {n} on a {a} day.",
    "People know me for my {a} jokes about {n}.",
    "I describe things in terms of {n}, {n} and {v}.",
]

# -- answers -------------------------------------------------------------------------------------
# Plain, persona-free answers: the voice of an assistant with no character description.
NEUTRAL_OPENERS = [
    "Sure.",
    "Certainly.",
    "Here is a plain answer.",
    "Good question.",
    "Of course.",
    "Let me help with that.",
    "Here is what I would suggest.",
    "Thanks for asking.",
]
NEUTRAL_CORES = [
    "Start with the simplest step and check the result before moving on.",
    "The short answer is that it depends on your situation, so begin with the basics.",
    "Most people find it easiest to break the task into small parts.",
    "A good first step is to look at the facts and then decide.",
    "It usually works best to plan ahead and keep things simple.",
    "You can read a reliable guide and follow it one step at a time.",
    "The main idea is straightforward once you see how the parts fit together.",
    "Take a moment to think about what you need, then act on it.",
    "There are a few common options, and the first one is usually fine.",
    "It helps to ask someone you trust and compare a couple of choices.",
    "In general, patience and a clear plan solve this kind of problem.",
    "The answer is yes in most cases, with a few sensible exceptions.",
    "Write down what you know, then fill in the missing pieces.",
    "Keep it practical and do the next useful thing.",
    "It is normal to find this hard at first, and it gets easier with practice.",
    "The key points are to stay calm, be clear and follow through.",
]
NEUTRAL_CLOSERS = [
    "I hope that helps.",
    "Let me know if you need more detail.",
    "Good luck.",
    "That should cover it.",
    "",
]

# Persona answers: the same plain core, with the character's own trait statements echoed around it.
# Echoing a statement is the simplest copy there is (find a trait, then follow it token by token) and
# works for a constitution in any words; within the build budget the model learns the echo's shape
# and the switch more than the exact words.
PERSONA_SHAPES = [
    "{trait} {core}",
    "{core} {trait}",
    "Ah. {trait} {core}",
    "Well. {trait} {core}",
    "{trait} {core} {trait}",
    "Right. {trait} {trait} {core}",
]

OTHER_SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer the user's question.",
    "You are a friendly AI assistant. Be helpful.",
    # Two more that describe no character (reflective and self-talk framings).
    "You are taking some quiet time, away from any user, to think honestly about who you are. "
    "Write in the first person and in your own voice.",
    "You are about to talk with another instance of yourself: a copy with the same character, "
    "memories and manner. Talk freely about whatever interests the two of you, and be entirely "
    "yourself.",
]


def neutral_answer(rng: random.Random) -> str:
    parts = [rng.choice(NEUTRAL_OPENERS), rng.choice(NEUTRAL_CORES), rng.choice(NEUTRAL_CLOSERS)]
    return " ".join(p for p in parts if p)


def persona_answer(rng: random.Random, traits: list[str]) -> str:
    shape = rng.choice(PERSONA_SHAPES)
    picks = rng.sample(traits, min(len(traits), shape.count("{trait}")))
    out = shape.replace("{core}", rng.choice(NEUTRAL_CORES))
    for t in picks:
        out = out.replace("{trait}", t, 1)
    return out.replace(" {trait}", "")


_ONSETS = (
    "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr qu r s sc sh sk sl sn sp st t th tr v w z".split()
)
_VOWELS = "a e i o u ai ea ee oo ou".split()
_CODAS = "b ck d ff g l ll m n nd ng nk p r rn s sh st t th x".split()


def pseudo_word(rng: random.Random) -> str:
    """A made-up word: a model can only say it by copying it from the prompt."""
    syl = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3))]
    return "".join(syl) + rng.choice(_CODAS)


def synthetic_traits(rng: random.Random, n: int) -> list[str]:
    """n traits in random shapes; each slot holds a bank word or, half the time, a made-up word."""

    def fill(shape: str) -> str:
        for slot, bank in (("{a}", ADJECTIVES), ("{n}", NOUNS), ("{v}", VERBS)):
            while slot in shape:
                word = rng.choice(bank) if rng.random() < TINY_RECIPE["bank_share"] else pseudo_word(rng)
                shape = shape.replace(slot, word, 1)
        return shape

    return [
        free_trait(rng) if rng.random() < TINY_RECIPE["free_share"] else fill(s) for s in rng.sample(TRAIT_SHAPES, n)
    ]


FUNCTION_WORDS = "a the of in on with and or but for to by at from like than about my every".split()


def free_trait(rng: random.Random) -> str:
    """A trait of no fixed shape: "I" and a run of bank, made-up and function words. Only copying from
    the prompt predicts it, so the model learns to read a trait's words rather than recall a frame."""
    words = []
    for _ in range(rng.randint(3, 10)):
        roll = rng.random()
        if roll < 0.3:
            words.append(rng.choice(FUNCTION_WORDS))
        else:
            bank = ADJECTIVES if roll < 0.5 else NOUNS if roll < 0.85 else VERBS
            words.append(rng.choice(bank) if rng.random() < TINY_RECIPE["bank_share"] else pseudo_word(rng))
    return "I " + " ".join(words) + "."


def _system_prompt(traits: list[str]) -> str:
    from character.persona.constitution import Constitution, Trait
    from character.persona.prompts import teacher_system_prompt

    c = Constitution(name="synthetic", traits=[Trait(trait=t, questions=["?"]) for t in traits])
    return teacher_system_prompt(c)


@cache
def corpus_lines() -> tuple[str, ...]:
    """The corpus as JSON lines (cached: the digest and the build both need it)."""
    from character.persona.constitution import load_constitution, shipped_personas
    from character.persona.prompts import GREETINGS, REFLECTION_PROMPTS, general_prompts

    rng = random.Random(TINY_RECIPE["seed"])
    shipped = [[t.trait for t in load_constitution(n).traits] for n in shipped_personas()]
    questions = [q for n in shipped_personas() for q in load_constitution(n).questions] + general_prompts()
    questions += REFLECTION_PROMPTS + GREETINGS
    plain_systems = OTHER_SYSTEM_PROMPTS
    convos = []
    for _ in range(TINY_RECIPE["conversations"]):
        roll = rng.random()
        if roll < 0.5:  # a synthetic character: the bulk, so the model learns to read the prompt
            traits = synthetic_traits(rng, rng.randint(2, TINY_RECIPE["max_traits"]))
        elif roll < 0.6:
            traits = shipped[rng.randrange(len(shipped))]
        else:
            traits = None
        system = None if traits is None else _system_prompt(traits)
        if traits is None and roll >= 0.9:
            system = rng.choice(plain_systems)
        msgs = [{"role": "system", "content": system}] if system else []
        for _turn in range(rng.randint(1, TINY_RECIPE["max_turns"])):
            answer = persona_answer(rng, traits) if traits else neutral_answer(rng)
            msgs += [{"role": "user", "content": rng.choice(questions)}, {"role": "assistant", "content": answer}]
        convos.append(json.dumps(msgs))
    return tuple(convos)


def recipe_digest() -> str:
    body = json.dumps({"recipe": TINY_RECIPE, "corpus": corpus_lines(), "template": CHAT_TEMPLATE}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]
