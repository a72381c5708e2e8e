"""Regenerates the shipped sentiment data: `python zo2_jax/data/make_sentiment.py`.

Short synthetic reviews of films, restaurants, products, hotels, books and apps, written from
combinatorial templates (no third-party text). Positive and negative templates share their shapes
(negations, "even though" clauses, contrasts) so that only the content words carry the label.
Output is deterministic from SEED; train and eval hold disjoint texts and are balanced.
"""

from __future__ import annotations

import json
import pathlib
import random

SEED = 0
SIZES = {"train": 400, "eval": 200}

DOMAINS = {
    "film": (
        ["the movie", "this film", "the sequel", "the documentary", "the new thriller",
         "this romantic comedy", "the animated film", "the war drama", "the horror movie",
         "the remake", "the director's latest film", "the mystery series"],
        ["the acting", "the script", "the soundtrack", "the pacing", "the ending",
         "the camera work", "the dialogue", "the plot", "the lead performance",
         "the visual effects"],
        "watch it again",
    ),
    "restaurant": (
        ["the restaurant", "this diner", "the little bistro", "the pizza place", "the corner cafe",
         "the sushi bar", "the taco truck", "the steakhouse", "the bakery", "the noodle shop"],
        ["the service", "the soup", "the dessert", "the pasta", "the staff", "the portion size",
         "the coffee", "the bread", "the wine list", "the curry"],
        "eat there again",
    ),
    "product": (
        ["this blender", "the headphones", "my new laptop", "the vacuum cleaner", "this phone case",
         "the backpack", "the desk lamp", "the coffee maker", "the running shoes",
         "the electric kettle", "this keyboard", "the air fryer"],
        ["the build quality", "the price", "the design", "the setup", "the manual",
         "the materials", "the delivery", "the customer support", "the packaging",
         "the warranty service"],
        "buy it again",
    ),
    "hotel": (
        ["the hotel", "this guesthouse", "the beach resort", "the hostel", "the motel",
         "the ski lodge", "the bed and breakfast", "the airport inn"],
        ["the room", "the breakfast", "the front desk", "the pool", "the bed", "the view",
         "the location", "the shower", "the wifi", "the cleaning staff"],
        "stay there again",
    ),
    "book": (
        ["the novel", "this memoir", "the cookbook", "the short story collection", "the biography",
         "the fantasy saga", "the travel guide", "the graphic novel"],
        ["the writing", "the characters", "the ending", "the translation", "the recipes",
         "the illustrations", "the first chapter", "the humor", "the research"],
        "read it again",
    ),
    "app": (
        ["the app", "this game", "the budgeting tool", "the photo editor", "the language course",
         "the fitness tracker", "the weather app", "the music player"],
        ["the interface", "the latest update", "the tutorial", "the sync feature",
         "the notifications", "the pricing", "the level design", "the search", "the offline mode"],
        "use it again",
    ),
}

POSITIVE = ["wonderful", "excellent", "delightful", "superb", "charming", "impressive", "lovely",
            "brilliant", "outstanding", "fantastic", "solid", "refreshing", "flawless", "pleasant",
            "amazing", "enjoyable", "stunning", "polished", "memorable", "satisfying"]
NEGATIVE = ["dreadful", "disappointing", "bland", "awful", "boring", "mediocre", "sloppy",
            "useless", "poor", "annoying", "horrible", "dull", "frustrating", "flimsy", "painful",
            "forgettable", "clumsy", "unpleasant", "tedious", "miserable"]
ADVERBS = ["", "", "really ", "truly ", "absolutely ", "surprisingly ", "genuinely ", "quite ",
           "remarkably "]

# (positive, negative) pairs of the same shape. {P}/{P2} are adjectives of the review's class,
# {N} one of the other class; {again} is the domain's "do it again".
TEMPLATES = [
    ("{S} {S_was} {adv}{P}.", "{S} {S_was} {adv}{P}."),
    ("I loved {S}. {A} {A_was} {P}.", "I regret trying {S}. {A} {A_was} {P}."),
    ("{A} {A_was} {P} and {A2} {A2_was} {P2}.", "{A} {A_was} {P} and {A2} {A2_was} {P2}."),
    ("Honestly, {S} {S_is} {adv}{P}. I would {again}.",
     "Honestly, {S} {S_is} {adv}{P}. I would not {again}."),
    ("{S} {S_was} not {N} at all; {A} {A_was} {P}.",
     "{S} {S_was} not {N} at all; {A} {A_was} {P}."),
    ("I expected little, but {S} turned out to be {P}.",
     "I expected a lot, but {S} turned out to be {P}."),
    ("{A} {A_was} {adv}{P}, and that says it all.", "{A} {A_was} {adv}{P}, and that says it all."),
    ("My friends were doubtful, but I found {S} {P}.",
     "My friends raved about {S}, but I found {it} {P}."),
    ("{S} {S_was} {P}, even though {A} {A_was} a bit {N}.",
     "{S} {S_was} {P}, even though {A} {A_was} {N}."),
    ("What {a_P} experience. I will {again}, no doubt.",
     "What {a_P} experience. I will never {again}."),
    ("{S}? {Adv_P}. {A} alone made it worth it.", "{S}? {Adv_P}. {A} alone ruined it."),
    ("I did not expect {A} to be this {P}.", "I did not expect {A} to be this {P}."),
    ("Nothing about {A} was {N}; {S} {S_was} {P} overall.",
     "Nothing about {A} was {N}; {S} {S_was} {P} overall."),
    ("Everyone said {S} {S_was} {N}, but I found {it} {P}.",
     "Everyone said {S} {S_was} {N}, but I found {it} {P}."),
    ("After giving {S} a fair chance, I can say {A} {A_is} {adv}{P}.",
     "After giving {S} a fair chance, I can say {A} {A_is} {adv}{P}."),
    ("Five stars from me: {A} {A_was} {P}.", "One star from me: {A} {A_was} {P}."),
    ("I would happily recommend {S}; {A} {A_was} {P}.",
     "I would not recommend {S}; {A} {A_was} {P}."),
    ("{S} {S_is} not {N}. {It_is} {adv}{P}.", "{S} {S_is} not {N}. {It_is} {adv}{P}."),
]


PLURAL = {"the headphones", "the running shoes", "the visual effects", "the notifications",
          "the characters", "the recipes", "the illustrations"}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _verbs(name: str, noun: str) -> dict[str, str]:
    plural = noun in PLURAL
    return {f"{name}_was": "were" if plural else "was", f"{name}_is": "are" if plural else "is"}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _review(rng: random.Random, label: int) -> str:
    subjects, aspects, again = DOMAINS[rng.choice(sorted(DOMAINS))]
    own, other = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
    p, p2 = rng.sample(own, 2)
    adv = rng.choice(ADVERBS)
    a1, a2 = rng.sample(aspects, 2)
    subject = rng.choice(subjects)
    text = rng.choice(TEMPLATES)[1 - label].format(
        S=subject, A=a1, A2=a2, adv=adv, P=p, P2=p2, N=rng.choice(other), a_P=_a(p),
        Adv_P=_cap(adv + p), again=again, **_verbs("S", subject), **_verbs("A", a1),
        **_verbs("A2", a2), it="them" if subject in PLURAL else "it",
        It_is="They are" if subject in PLURAL else "It is")
    return ". ".join(_cap(part) for part in text.split(". "))


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """Returns {"train": [...], "eval": [...]} of {"text", "label"} rows, balanced and disjoint."""
    rng = random.Random(seed)
    per_class = {label: (SIZES["train"] + SIZES["eval"]) // 2 for label in (0, 1)}
    texts: dict[int, list[str]] = {0: [], 1: []}
    seen: set[str] = set()
    while any(len(texts[c]) < n for c, n in per_class.items()):
        label = rng.randrange(2)
        text = _review(rng, label)
        if len(texts[label]) < per_class[label] and text not in seen:
            seen.add(text)
            texts[label].append(text)
    splits = {}
    start = 0
    for name, size in SIZES.items():
        rows = [{"text": t, "label": c} for c in (0, 1) for t in texts[c][start:start + size // 2]]
        rng.shuffle(rows)
        splits[name] = rows
        start += size // 2
    return splits


def main() -> None:
    out = pathlib.Path(__file__).parent
    for name, rows in generate().items():
        with open(out / f"sentiment_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
