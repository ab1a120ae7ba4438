"""A synthetic multi-step arithmetic word-problem task, and the text the embedded base model
is pre-trained on.

Why synthetic: the default model must be fine-tuned and evaluated with no downloads, and the
result must show LoRA doing something measurable. A problem is a short story over small
numbers ("Ann has 3 apples. She buys 4 more. She gives away 2. How many apples does Ann have
now?\n"); the response works it out in a fixed short chain ("3 + 4 = 7. 7 - 2 = 5. Answer: 5"),
so each token is one copied number or one small addition/subtraction fact, which a tiny
model can learn. Exact match compares the whole chain.

The pre-training corpus teaches the same vocabulary, the same arithmetic facts and what the
verbs mean, but never in the task's form: no word problem in it is followed by a question and
a worked chain; stories carry their sums inline or in a "Working it out: ..." sentence, and
the only question/answer lines are bare sums. The base model therefore knows the pieces but
scores near zero exact-match, and fine-tuning has to teach the format and the mapping from a
question to the chain, which is what raises exact-match. Every token the task uses occurs in
the corpus: LoRA does not train embeddings, so a token the base never saw would keep its
random initial vector and could not be learned.

Everything is deterministic in `seed`. Train and test are disjoint by construction: a
problem's split is a hash of its arithmetic skeleton (start value and signed steps), so the
test set holds number chains never seen in training under any name or object.

Two variants (`VARIANTS`): "base" (2-3 steps; plain LoRA reaches ~95-100% exact match: the
quick default) and "hard" (3-5 steps, and one distractor sentence about someone else's things
placed among the events; that person has the other pronoun, so every "She"/"He" still points at
one person), on which methods can end measurably better or worse than LoRA. The hard variant
uses only words, numbers and sentence forms the base variant and the corpus use, so the same
embedded base model serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
TEST_FRACTION = 0.2  # of the problem skeletons

MAX_VALUE = 20  # every number in a problem, running totals included, lies in 0..MAX_VALUE
START_RANGE = (2, 12)
AMOUNT_RANGE = (1, 6)
STEP_COUNTS = (2, 3)
# variant -> (step counts, with a distractor sentence)
VARIANTS: dict[str, tuple[tuple[int, ...], bool]] = {"base": (STEP_COUNTS, False), "hard": ((3, 4, 5), True)}

# Ends every prompt: the response follows directly. A newline is its own pre-token whatever
# follows, so the prompt and response tokenize the same apart as joined.
PROMPT_SUFFIX = "\n"

NAMES: tuple[tuple[str, str], ...] = (
    ("Ann", "She"), ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"),
    ("Emma", "She"), ("Jack", "He"), ("Zoe", "She"), ("Max", "He"), ("Ruth", "She"), ("Leo", "He"),
)
OBJECTS: tuple[str, ...] = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles",
                            "cookies", "stickers", "toys", "eggs")
# (present, past): the task is in the present tense, the corpus in both.
GAIN_VERBS: tuple[tuple[str, str], ...] = (("buys", "bought"), ("finds", "found"), ("gets", "got"), ("wins", "won"))
LOSS_VERBS: tuple[tuple[str, str], ...] = (("gives away", "gave away"), ("loses", "lost"), ("sells", "sold"),
                                           ("uses", "used"))


@dataclass(frozen=True)
class Step:
    amount: int  # signed: +3 is a gain of 3, -2 a loss of 2
    verb: int  # index into GAIN_VERBS or LOSS_VERBS by sign


@dataclass(frozen=True)
class Distractor:
    """'{name} has {count} {obj}.' about someone else, said before event `position`."""

    name: int
    obj: int
    count: int
    position: int


@dataclass(frozen=True)
class Problem:
    name: int
    obj: int
    start: int
    steps: tuple[Step, ...]
    distractor: Distractor | None = None

    def skeleton(self) -> str:
        """The arithmetic alone: what decides the split, so no number chain is in both."""
        return ",".join([str(self.start)] + [f"{s.amount:+d}" for s in self.steps])


def _verb(step: Step, past: bool) -> str:
    table = GAIN_VERBS if step.amount > 0 else LOSS_VERBS
    return table[step.verb][1 if past else 0]


def _equation(a: int, b: int) -> str:
    """`a + b = c` or `a - b = c` for the signed step b: the one form of a fact used everywhere."""
    return f"{a} {'+' if b > 0 else '-'} {abs(b)} = {a + b}"


def render_prompt(p: Problem) -> str:
    """The question, ending with PROMPT_SUFFIX so the response can follow directly."""
    name, pron = NAMES[p.name]
    obj = OBJECTS[p.obj]
    parts = [f"{name} has {p.start} {obj}."]
    d = p.distractor
    for i, s in enumerate(p.steps):
        if d is not None and d.position == i:
            parts.append(f"{NAMES[d.name][0]} has {d.count} {OBJECTS[d.obj]}.")
        more = " more" if s.amount > 0 else ""
        parts.append(f"{pron} {_verb(s, past=False)} {abs(s.amount)}{more}.")
    parts.append(f"How many {obj} does {name} have now?")
    return " ".join(parts) + PROMPT_SUFFIX


def render_response(p: Problem) -> str:
    """One equation per step, then the answer: short, and each token is a copy or one fact."""
    value, eqs = p.start, []
    for s in p.steps:
        eqs.append(_equation(value, s.amount) + ".")
        value += s.amount
    return " ".join(eqs) + f" Answer: {value}"


def _sample_problem(rng: random.Random, variant: str = "base") -> Problem | None:
    """A random problem, or None when a running total leaves 0..MAX_VALUE (the caller redraws)."""
    step_counts, with_distractor = VARIANTS[variant]
    start = rng.randint(*START_RANGE)
    value, steps = start, []
    for _ in range(rng.choice(step_counts)):
        amount = rng.randint(*AMOUNT_RANGE) * rng.choice((1, -1))
        value += amount
        if not 0 <= value <= MAX_VALUE:
            return None
        table = GAIN_VERBS if amount > 0 else LOSS_VERBS
        steps.append(Step(amount, rng.randrange(len(table))))
    name, obj = rng.randrange(len(NAMES)), rng.randrange(len(OBJECTS))
    distractor = None
    if with_distractor:  # the other pronoun, another object: unambiguous, and its number is a trap
        others = [i for i, (_, pron) in enumerate(NAMES) if pron != NAMES[name][1]]
        distractor = Distractor(rng.choice(others), rng.choice([o for o in range(len(OBJECTS)) if o != obj]),
                                rng.randint(*START_RANGE), rng.randrange(len(steps)))
    return Problem(name, obj, start, tuple(steps), distractor)


def split_of(p: Problem) -> str:
    """'test' for a fixed hash-chosen TEST_FRACTION of skeletons, else 'train' (seed-free, so
    every seed and every process agrees on the split)."""
    h = int.from_bytes(hashlib.sha256(p.skeleton().encode()).digest()[:8], "little")
    return "test" if (h % 10_000) < TEST_FRACTION * 10_000 else "train"


def _derived_seed(seed: int, purpose: str) -> int:
    """Independent random streams per purpose (train, test, pretrain) from one user seed."""
    return int.from_bytes(hashlib.sha256(f"arithmetic:{seed}:{purpose}".encode()).digest()[:8], "little")


def make_examples(n: int, seed: int, split: str, variant: str = "base") -> list[dict]:
    """`n` distinct problems of `split` as {"prompt", "response"} dicts, deterministic in `seed`.

    Problems are drawn and kept only if their skeleton hashes into `split`, so train and test
    never share a number chain whatever seeds and sizes are used."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    rng = random.Random(_derived_seed(seed, split if variant == "base" else f"{variant}:{split}"))
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct {split} problems (only {len(out)} found)")
        p = _sample_problem(rng, variant)
        if p is None or split_of(p) != split:
            continue
        prompt = render_prompt(p)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": render_response(p)})
    return out


def write_task(directory: str | Path, n_train: int, n_test: int, seed: int, variant: str = "base") -> dict[str, Path]:
    """Write `train.jsonl` and `test.jsonl` (one {"prompt", "response"} object a line) and
    return their paths by split: the files the training and evaluation code read. Each file is
    written whole then renamed, so concurrent writers (ranks) never leave half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        path = directory / f"{split}.jsonl"
        lines = (json.dumps(ex, ensure_ascii=False) for ex in make_examples(n, seed, split, variant))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
        paths[split] = path
    return paths


def read_task(path: str | Path) -> list[dict]:
    """The examples of one jsonl file written by `write_task`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- pre-training corpus -----------------------------------------------------------------

def _random_problem(rng: random.Random) -> Problem:
    while (p := _sample_problem(rng)) is None:
        pass
    return p


def _random_fact(rng: random.Random) -> tuple[int, int]:
    """(a, signed b) with a, b and a + b in 0..MAX_VALUE and |b| at most twice the task's amounts."""
    a = rng.randint(0, MAX_VALUE)
    b = rng.randint(-min(a, AMOUNT_RANGE[1] * 2), min(MAX_VALUE - a, AMOUNT_RANGE[1] * 2)) or 1
    return (a, b) if 0 <= a + b <= MAX_VALUE else (a, -b)


def _fact_document(rng: random.Random) -> str:
    """Addition/subtraction facts in the equation form the responses use, on one line or one a
    line (so a number at the start of a line, as a response begins, is a known token too)."""
    facts = [_equation(*_random_fact(rng)) + "." for _ in range(rng.randint(4, 10))]
    return (" " if rng.random() < 0.5 else "\n").join(facts)


def _quiz_document(rng: random.Random) -> str:
    """A bare arithmetic question and its answer: the words of the task's question and answer
    line, but no story and no worked chain."""
    a, b = _random_fact(rng)
    sep = " " if rng.random() < 0.5 else "\n"
    return f"Question: How many is {a} {'+' if b > 0 else '-'} {abs(b)}?{sep}Answer: {a + b}"


def _story_document(rng: random.Random) -> str:
    """A story with the running total worked out after every event, in either tense: ties
    each verb to + or -, without the task's question or answer chain."""
    p, past = _random_problem(rng), rng.random() < 0.5
    (name, pron), obj = NAMES[p.name], OBJECTS[p.obj]
    has = "had" if past else "has"
    value, parts = p.start, [f"{name} {has} {p.start} {obj}."]
    for s in p.steps:
        new = value + s.amount
        parts.append(f"Then {pron.lower()} {_verb(s, past)} {abs(s.amount)}, and {_equation(value, s.amount)}, "
                     f"so {pron.lower()} {has} {new} {obj}.")
        value = new
    return " ".join(parts)


def _recap_document(rng: random.Random) -> str:
    """A story told first and worked out after, in either tense: practises recalling every
    number of a story to chain the equations, still without the task's question or its
    answer form (equations joined by 'and', the result in a sentence)."""
    p, past = _random_problem(rng), rng.random() < 0.5
    (name, pron), obj = NAMES[p.name], OBJECTS[p.obj]
    has = "had" if past else "has"
    events = [f"{pron} {_verb(s, past)} {abs(s.amount)}." for s in p.steps]
    value, eqs = p.start, []
    for s in p.steps:
        eqs.append(_equation(value, s.amount))
        value += s.amount
    return (f"{name} {has} {p.start} {obj}. {' '.join(events)} "
            f"Working it out: {' and '.join(eqs)}, so in the end {name} {has} {value} {obj}.")


def _meaning_document(rng: random.Random) -> str:
    """What a present-tense verb of the task does, as a general statement."""
    (name, pron), obj = NAMES[rng.randrange(len(NAMES))], OBJECTS[rng.randrange(len(OBJECTS))]
    n, m = rng.randint(*START_RANGE), rng.randint(*AMOUNT_RANGE)
    gain = rng.random() < 0.5
    verb = rng.choice(GAIN_VERBS if gain else LOSS_VERBS)[0]
    event = f"{verb} {m} more" if gain else f"{verb} {m}"
    return (f"What does {name} have now? {name} has {n} {obj}. When {pron.lower()} {event}, "
            f"{pron.lower()} has {m} {'more' if gain else 'fewer'} {obj} than before.")


_DOCUMENT_KINDS = ((_story_document, 0.3), (_recap_document, 0.3), (_fact_document, 0.15), (_quiz_document, 0.1),
                   (_meaning_document, 0.15))


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """`n` short documents (stories, recaps, facts, quizzes, verb meanings), deterministic in
    `seed`: what the embedded base model learns the words and the arithmetic from before any
    fine-tuning. Every token of the task occurs in it, so no embedding the task needs is left
    at its random initial value (LoRA does not train embeddings)."""
    rng = random.Random(_derived_seed(seed, "pretrain"))
    kinds = [k for k, _ in _DOCUMENT_KINDS]
    weights = [w for _, w in _DOCUMENT_KINDS]
    return [rng.choices(kinds, weights)[0](rng) for _ in range(n)]


def task_vocabulary() -> list[str]:
    """Every word and number the task can use, plus a few whole examples: fed to the tokenizer
    trainer beside the corpus so the task's words get whole-word tokens."""
    words = [n for n, _ in NAMES] + [p for _, p in NAMES] + list(OBJECTS)
    words += [v for pair in GAIN_VERBS + LOSS_VERBS for v in pair]
    words += [str(i) for i in range(MAX_VALUE + 1)]
    sample = make_examples(20, seed=0, split="train")
    return [" ".join(words)] + [ex["prompt"] + ex["response"] for ex in sample]
