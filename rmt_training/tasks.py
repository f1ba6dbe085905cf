"""The RMT report's 6-class memory tasks, hidden in public-domain natural-language noise.

- memorize: one fact at the start of the document, the question at its end;
- detect_memorize: one fact at a random sentence boundary;
- reasoning: two facts at random boundaries (bAbI two-argument relations); the answer needs both;
- qa1: BABILong's first task: a story of several people moving, in order at random boundaries; the
  answer is where the person asked about went last;
- no_fact: "Where is Mary?" over noise alone, with no fact: the answer is `unknown` (a classifier's 7th label).

Facts follow bAbI templates ("Mary travelled to the office." / "Where is Mary?"); the answer is one of
six places. Noise is text shipped with this package (`noise/`): Project Gutenberg's Shakespeare for
training, Milton as held-out noise, and Python's documentation (technical prose, PSF License) as held-out noise of
another genre; numpy's, SciPy's and scikit-learn's docstrings (BSD-3-Clause) are technical prose to train on
(`shakespeare+library_docs` mixes the two genres). Lengths are counted in tokens of the tokenizer given, and every
sample is a pure function of (task, seed, index, length), so any sample can be rebuilt on its own.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

NAMES = ("Mary", "John", "Daniel", "Sandra")
VERBS = ("travelled to", "went to", "moved to", "journeyed to", "went back to")
PLACES = ("office", "bathroom", "garden", "hallway", "kitchen", "bedroom")
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}
TASKS = ("memorize", "detect_memorize", "reasoning", "qa1", "no_fact")
# Document streams by seed: a training run's `seed`, its validation `seed + VALIDATION_SEED_OFFSET`, and
# evaluation `HELD_OUT_SEED` (on held-out noise as well); `check_held_out` keeps them apart.
VALIDATION_SEED_OFFSET = 1_000_003
HELD_OUT_SEED = 2_000_003
QA1_FACTS = (2, 8)  # a qa1 story has this many movements (inclusive range)
NOISE_FOLDER = Path(__file__).parent / "noise"
NOISE_CORPORA = ("shakespeare", "milton", "python_docs", "library_docs")
ID2LABEL = dict(enumerate(PLACES))
LABEL2ID = {place: index for index, place in ID2LABEL.items()}
# The answer to a question the document does not answer (task no_fact), a classifier's 7th label.
UNKNOWN = "unknown"
ID2LABEL_WITH_UNKNOWN = {**ID2LABEL, len(PLACES): UNKNOWN}


@functools.lru_cache(maxsize=4)
def noise_sentences(corpus: str = "shakespeare") -> tuple[str, ...]:
    """Sentences of a shipped noise corpus, without any that name a person of the facts. `a+b` mixes corpora in
    about equal shares: each one's sentences repeated the whole number of times nearest to the largest one's count
    (documents draw sentences uniformly; shakespeare+library_docs: 50/50)."""
    if "+" in corpus:
        parts = [noise_sentences(part) for part in corpus.split("+")]
        largest = max(len(part) for part in parts)
        return tuple(sentence for part in parts for sentence in part * round(largest / len(part)))
    path = NOISE_FOLDER / f"{corpus}.txt.gz" if corpus in NOISE_CORPORA else Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"No noise corpus {corpus!r}: use one of {NOISE_CORPORA} or a .txt.gz file path.")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        sentences = [line.strip() for line in handle if line.strip()]
    return tuple(s for s in sentences if not any(name in s for name in NAMES))


class TokenizedNoise:
    """A noise corpus tokenized once, sentence by sentence, by one tokenizer."""

    def __init__(self, tokenizer, corpus: str = "shakespeare") -> None:
        sentences = noise_sentences(corpus)
        tokenized = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
        kept = [(sentence, ids) for sentence, ids in zip(sentences, tokenized, strict=True) if ids]  # no empty ones
        if not kept:
            raise ValueError(f"The noise corpus {corpus!r} has no sentence with tokens.")
        self.sentences, self.ids = tuple(s for s, _ in kept), [ids for _, ids in kept]
        self.lengths = np.array([len(ids) for ids in self.ids])
        self.by_length = np.argsort(self.lengths, kind="stable")
        self.sorted_lengths = self.lengths[self.by_length]


@dataclass
class TaskSample:
    """One document: `input` (noise with the facts), `question`, `target` (a place), `label`,
    `input_ids` (input then question, without special tokens) and the `facts` hidden in it."""

    input: str
    question: str
    target: str
    label: int
    input_ids: list[int]
    facts: list[str]


def task_facts(task: str, rng: np.random.Generator) -> tuple[list[str], str, str]:
    """The facts, the question and the answer of one sample."""
    if task in ("memorize", "detect_memorize"):
        name, verb, place = NAMES[rng.integers(4)], VERBS[rng.integers(5)], PLACES[rng.integers(6)]
        return [f"{name} {verb} the {place}."], f"Where is {name}?", place
    if task == "qa1":
        moves = [(NAMES[rng.integers(4)], VERBS[rng.integers(5)], PLACES[rng.integers(6)])
                 for _ in range(rng.integers(QA1_FACTS[0], QA1_FACTS[1] + 1))]  # fmt: skip
        asked = moves[rng.integers(len(moves))][0]
        last_place = [place for name, _, place in moves if name == asked][-1]
        return [f"{name} {verb} the {place}." for name, verb, place in moves], f"Where is {asked}?", last_place
    if task == "reasoning":
        hub, first, second = (PLACES[i] for i in rng.permutation(6)[:3])
        toward_first, toward_second = (list(DIRECTIONS)[i] for i in rng.permutation(4)[:2])
        facts = [f"The {first} is {toward_first} of the {hub}.", f"The {second} is {toward_second} of the {hub}."]
        if rng.integers(2):  # read a fact directly
            return facts, f"What is {toward_first} of the {hub}?", first
        return facts, f"What is the {hub} {DIRECTIONS[toward_second]} of?", second  # invert the other
    if task == "no_fact":  # the question over noise alone: the document does not answer it
        return [], f"Where is {NAMES[rng.integers(4)]}?", UNKNOWN
    raise ValueError(f"Unknown task {task!r}: use one of {TASKS}.")


def make_sample(task: str, noise: TokenizedNoise, tokenizer, num_tokens: int, seed: int, index: int) -> TaskSample:
    """A document of at most `num_tokens` tokens (input + question) whose noise fills all but the
    facts and the question; the facts sit at sentence boundaries (the first one for memorize)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: use one of {TASKS}.")
    rng = np.random.default_rng([seed, index, TASKS.index(task)])
    facts, question, target = task_facts(task, rng)
    fact_ids = tokenizer(facts, add_special_tokens=False)["input_ids"] if facts else []
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    budget = num_tokens - len(question_ids) - sum(len(ids) for ids in fact_ids)
    if budget < 0:
        raise ValueError(
            f"A {task} document of {num_tokens} tokens cannot hold its facts and question "
            f"({num_tokens - budget} tokens): ask for at least {num_tokens - budget} tokens."
        )
    chosen: list[int] = []
    while True:  # draw sentences in blocks until the budget is spent
        draws = rng.integers(len(noise.ids), size=max(16, 2 * budget // max(int(noise.lengths.mean()), 1)))
        lengths = np.cumsum(noise.lengths[draws]) + (sum(noise.lengths[chosen]) if chosen else 0)
        fits = int(np.searchsorted(lengths, budget, side="right"))
        chosen.extend(draws[:fits].tolist())
        if fits < len(draws):
            break
    used = int(noise.lengths[chosen].sum()) if chosen else 0
    while (count := int(np.searchsorted(noise.sorted_lengths, budget - used, side="right"))) > 0:
        chosen.append(int(noise.by_length[rng.integers(count)]))  # top up with sentences that still fit
        used += int(noise.lengths[chosen[-1]])
    places = [0] if task == "memorize" else sorted(rng.integers(len(chosen) + 1, size=len(facts)).tolist())
    pieces = [(noise.sentences[i], noise.ids[i]) for i in chosen]
    for place, fact, tokens in reversed(list(zip(places, facts, fact_ids, strict=True))):
        pieces.insert(place, (fact, tokens))  # from the back (places are sorted), so earlier places stay valid
    ids = [token for _, tokens in pieces for token in tokens]
    text = " ".join(text for text, _ in pieces)
    label = len(PLACES) if target == UNKNOWN else LABEL2ID[target]
    return TaskSample(text, question, target, label, ids + question_ids, facts)


def with_special_tokens(tokenizer, ids: list[int]) -> list[int]:
    """`[CLS] ids [SEP]` for an encoder tokenizer (`<s> ids </s>` for RoBERTa-style ones)."""
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no [CLS]/[SEP] tokens: the memory tasks need an encoder's.")
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def iter_task(
    task: str, tokenizer, num_tokens: int, size: int, seed: int = 0, noise: str | TokenizedNoise = "shakespeare"
) -> Iterator[TaskSample]:
    """`size` samples of one task and length."""
    tokenized = noise if isinstance(noise, TokenizedNoise) else TokenizedNoise(tokenizer, noise)
    for index in range(size):
        yield make_sample(task, tokenized, tokenizer, num_tokens, seed, index)


def build_task_dataset(
    task: str,
    tokenizer,
    num_tokens: int,
    size: int,
    seed: int = 0,
    noise: str = "shakespeare",
    with_text: bool = True,
) -> Dataset:
    """A `datasets.Dataset` of one task at one length: `input`, `question`, `target` (the BABILong
    fields), `label`, and `input_ids`/`attention_mask` for an encoder (`[CLS] input question [SEP]`)."""
    rows = []
    for sample in iter_task(task, tokenizer, num_tokens, size, seed, noise):
        ids = with_special_tokens(tokenizer, sample.input_ids)
        row = {"label": sample.label, "input_ids": ids, "attention_mask": [1] * len(ids)}
        if with_text:
            row |= {"input": sample.input, "question": sample.question, "target": sample.target}
        rows.append(row)
    return Dataset.from_list(rows)


def check_held_out(train_seed: int, eval_seed: int) -> None:
    """Refuse an evaluation seed that is a run's training or validation seed: its documents (their
    facts and positions) would be ones the model trained or was selected on."""
    streams = {train_seed: "training", train_seed + VALIDATION_SEED_OFFSET: "validation"}
    if eval_seed in streams:
        raise SystemExit(
            f"Seed {eval_seed} is the {streams[eval_seed]} seed of a run trained with --seed {train_seed}, so "
            f"its documents are not held out; evaluate with another --seed, or train with a seed other than "
            f"{eval_seed} and {eval_seed - VALIDATION_SEED_OFFSET}."
        )
