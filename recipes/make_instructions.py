"""Generate the bundled instruction set of the embedded default run (Alpaca format, exactly checkable answers).

    python -m zinit.recipes.make_instructions          # rewrites recipes/data/instructions_{train,heldout}.json

Seven task families whose answers are one short string, so a greedy answer is right or wrong by exact match:
capital of a country, opposite of a word, the larger of two numbers, a number in words, the first letter of a word,
a word in capitals, the next term of an arithmetic sequence. The held-out split uses countries, words and numbers
the training split never shows, so it measures whether the adapter learned the task and its answer format, not the
examples. The output is deterministic (fixed seed): re-running it reproduces the files byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .instructions import FAMILIES

DATA = Path(__file__).resolve().parent / "data"
SEED = 1234

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Colombia", "Bogota"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Ukraine", "Kyiv"), ("Czech Republic", "Prague"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("rich", "poor"),
    ("strong", "weak"), ("young", "old"), ("wet", "dry"), ("long", "short"), ("thick", "thin"), ("loud", "quiet"),
    ("clean", "dirty"), ("near", "far"), ("true", "false"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
    ("left", "right"), ("inside", "outside"), ("before", "after"), ("heavy", "light"), ("good", "bad"),
    ("day", "night"), ("begin", "end"), ("question", "answer"), ("friend", "enemy"), ("love", "hate"),
    ("north", "south"), ("east", "west"), ("first", "last"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("easy", "difficult"),
]
WORDS = [
    "apple", "banana", "cherry", "garden", "window", "river", "mountain", "pencil", "rocket", "silver", "turtle",
    "violin", "yellow", "zebra", "orange", "planet", "forest", "castle", "dragon", "marble", "candle", "jacket",
    "kitten", "lemon", "needle", "ocean", "pepper", "rabbit", "tiger", "umbrella", "basket", "button", "cactus",
    "dolphin", "engine", "feather", "guitar", "harbor", "island", "jungle", "ladder", "meadow", "nickel", "oyster",
    "parrot", "quilt", "saddle", "tunnel", "velvet", "walnut",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def _record(instruction: str, input_: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": input_, "output": output}


def _split(items: list, rng: random.Random, heldout: int) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    return items[heldout:], items[:heldout]


_TEXT = {family: text for text, family in FAMILIES.items()}


def make(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The (train, held-out) records."""
    rng = random.Random(seed)
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []

    cap_train, cap_test = _split(CAPITALS, rng, 10)
    for pool, out in ((cap_train, train), (cap_test, test)):
        out += [_record(_TEXT["capital"], c, k) for c, k in pool]
    opp_train, opp_test = _split(OPPOSITES, rng, 10)
    for pool, out in ((opp_train, train), (opp_test, test)):
        out += [_record(_TEXT["opposite"], a, b) for a, b in pool]
        out += [_record(_TEXT["opposite"], b, a) for a, b in pool]
    word_train, word_test = _split(WORDS, rng, 12)
    for pool, out in ((word_train, train), (word_test, test)):
        out += [_record(_TEXT["first letter"], w, w[0]) for w in pool]
        out += [_record(_TEXT["capitals"], w, w.upper()) for w in pool]
    num_train, num_test = _split(list(range(len(NUMBER_WORDS))), rng, 5)
    for pool, out in ((num_train, train), (num_test, test)):
        out += [_record(_TEXT["number in words"], str(n), NUMBER_WORDS[n]) for n in pool]

    seen: set[tuple[int, int]] = set()
    for out, count in ((train, 80), (test, 16)):
        while count:
            a, b = rng.sample(range(10, 100), 2)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            out.append(_record(_TEXT["larger"], f"{a}, {b}", str(max(a, b))))
            count -= 1
    seen_seq: set[tuple[int, int]] = set()
    for out, count in ((train, 80), (test, 16)):
        while count:
            start, step = rng.randint(1, 30), rng.randint(2, 9)
            if (start, step) in seen_seq:
                continue
            seen_seq.add((start, step))
            terms = [start + i * step for i in range(4)]
            out.append(_record(_TEXT["next in sequence"], ", ".join(map(str, terms)),
                               str(start + 4 * step)))
            count -= 1
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main() -> None:
    train, test = make()
    DATA.mkdir(exist_ok=True)
    for name, records in (("instructions_train.json", train), ("instructions_heldout.json", test)):
        (DATA / name).write_text(json.dumps(records, indent=1) + "\n")
        print(f"{DATA / name}: {len(records)} records")


if __name__ == "__main__":
    main()
