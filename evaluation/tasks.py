"""RULER-style synthetic long-context tasks, generated here at a target length in tokens.

Every sample is a prompt in the model's chat template whose assistant turn already starts with an
answer prefix (as RULER does for chat models), the list of expected answer strings, and a small
`max_new_tokens`. Tasks (after RULER, Hsieh et al. 2024), with settings sized for small models
(SmolLM2-135M-Instruct with dense attention at 4096 tokens, 4 samples each: niah_single 100,
niah_multikey 50, niah_multivalue 31, niah_multiquery 25, variable_tracking 44, common_words 17,
frequent_words 33):

- `niah_single`: one needle "One of the special magic numbers for {key} is: {value}." in a
  haystack of prose; asked for the key's number.
- `niah_multikey`: four needles of different keys; asked for one of them (three distract).
- `niah_multivalue`: four needles with the same key and different numbers; asked for all four.
- `niah_multiquery`: two needles of different keys; asked for both.
- `variable_tracking`: a chain "VAR A = 12345", "VAR B = VAR A", ... (four variables) spread
  over the prose; asked for every variable that holds the value (the answer starts with "VAR").
- `common_words`: a numbered list where three common words fill about half the entries and the
  rare words appear 3 times each; asked for the three most common.
- `frequent_words`: a text of coded words drawn from a Zipf distribution; asked for the three
  most frequent.

The prose (haystack) is the docstring sentences of the Python standard library's held-out files
(:func:`hata_jax.train.corpus.stdlib_corpus`, no digits, so no false needles); keys and the common words
come from its vocabulary. A sample is a pure function of (task, target length, index, seed) and
the tokenizer (and the Python version's standard library): the haystack grows by whole units
(sentences or list entries) to the largest size whose prompt fits in `length` tokens.

Scoring is RULER's string match: the share of expected answers found in the prediction
(case-insensitive substring), averaged over samples (x100 in tables).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import re
import zlib
from collections.abc import Callable

import numpy as np

from hata_jax.train import corpus as corpus_lib


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt and its expected answers.

    Attributes:
      task, length, index: what generated it (`length` is the target in tokens).
      tokens: the prompt's token ids (chat template and answer prefix included), at most `length`.
      answers: strings the answer must contain (all of them for full credit).
      max_new_tokens: the decode length the answer needs.
    """

    task: str
    length: int
    index: int
    tokens: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.length}/{self.index}"

    @property
    def digest(self) -> str:
        return digest(self.tokens, self.answers)


def digest(tokens, answers=()) -> str:
    """A short sha256 of token ids and answers (a resumed run checks that its prompts are unchanged)."""
    return hashlib.sha256(repr((tuple(int(t) for t in tokens), tuple(answers))).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Parts:
    """A prompt before tokenization: the user message, the start of the answer, the answers."""

    user: str
    answer_prefix: str
    answers: tuple[str, ...]


# ------------------------------------------------------------------------------------- the prose


@functools.lru_cache(maxsize=1)
def prose() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sentences, words): the distinct prose sentences of the held-out standard library's docstrings
    (30-250 characters of letters and punctuation, no digits), sorted, and their lowercase words of
    4-9 letters, sorted."""
    sentences = set()
    for path in corpus_lib.stdlib_corpus("heldout").files:
        text = corpus_lib.read_text(path)
        try:
            tree = ast.parse(text or "")
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                    if re.fullmatch(r"[A-Z][A-Za-z ,;'()-]{30,250}[.!?]", sentence):
                        sentences.add(sentence)
    words = {w for s in sentences for w in re.findall(r"\b[a-z]{4,9}\b", s)}
    if len(sentences) < 100 or len(words) < 500:
        raise ValueError(f"the standard library's docstrings gave too little prose ({len(sentences)} sentences, "
                         f"{len(words)} words) for the synthetic tasks")
    return tuple(sorted(sentences)), tuple(sorted(words))


def _haystack(rng: np.random.Generator, units: int) -> list[str]:
    """`units` prose sentences in a seeded order (cycling through every sentence before repeating)."""
    sentences, _ = prose()
    order = np.concatenate([rng.permutation(len(sentences)) for _ in range(units // len(sentences) + 1)])
    return [sentences[i] for i in order[:units]]


def _insert(haystack: list[str], inserts: list[str], depths: np.ndarray) -> str:
    """Put `inserts[i]` between sentences at relative depth `depths[i]` in [0, 1] (in order of depth)."""
    out = list(haystack)
    for depth, text in sorted(zip(depths, inserts), key=lambda pair: pair[0], reverse=True):
        out.insert(int(round(depth * len(haystack))), text)
    return " ".join(out)


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        item = draw()
        if item not in out:
            out.append(item)
    return out


def _number(rng: np.random.Generator, digits: int) -> str:
    return str(rng.integers(10 ** (digits - 1), 10 ** digits))


def _magic_key(rng: np.random.Generator) -> str:
    _, words = prose()
    return "-".join(words[i] for i in rng.choice(len(words), 2, replace=False))


# ------------------------------------------------------------------------------------- the tasks

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
NIAH_DIGITS = 7


def _niah(rng: np.random.Generator, units: int, *, keys: int, values_per_key: int, queries: int) -> Parts:
    """`keys` x `values_per_key` needles at random depths; asks for the values of the first `queries` keys."""
    names = _distinct(lambda: _magic_key(rng), keys)
    values = [_distinct(lambda: _number(rng, NIAH_DIGITS), values_per_key) for _ in names]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(names, values) for v in vs]
    depths = rng.uniform(0, 1, len(needles))
    context = _insert(_haystack(rng, units), needles, depths)
    asked = names[:queries]
    if queries > 1:
        query = ", ".join(asked[:-1]) + " and " + asked[-1]
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
    elif values_per_key > 1:
        question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked[0]} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
    answers = tuple(v for vs in values[:queries] for v in vs)
    return Parts(f"{NIAH_INTRO}\n{context}\n{question}", prefix, answers)


VT_HOPS = 3  # variables in the chain: VT_HOPS + 1


def _variable_tracking(rng: np.random.Generator, units: int) -> Parts:
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names = _distinct(lambda: "".join(rng.choice(letters, 5)), VT_HOPS + 1)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = np.sort(rng.uniform(0, 1, len(chain)))
    context = _insert(_haystack(rng, units), chain, depths)
    user = (f"Memorize and track the chain of variable assignments hidden in the following text.\n\n{context}\n"
            f"Question: Find all variables that are assigned the value {value} in the text above.")
    prefix = (f"Answer: According to the chain of variable assignments in the text above, {len(names)} variables "
              f"are assigned the value {value}, they are: VAR")
    return Parts(user, prefix, tuple(names))


CWE_COMMON, CWE_COMMON_FREQ, CWE_RARE_FREQ = 3, 30, 3
CWE_PREFIX = f"Answer: The top {CWE_COMMON} words that appear most often in the list are:"


def _cwe_words() -> list[str]:
    """The prose words that may be listed: words inside the answer's prefix ("the", "list", "ear",
    ...) would give an answer away."""
    return [w for w in prose()[1] if w not in CWE_PREFIX]


def _common_words(rng: np.random.Generator, units: int) -> Parts:
    """`units` rare words (3 times each) and CWE_COMMON common words, each as often as there are
    rare words (at least 30 times): the common words fill about half the list, shuffled."""
    _, words = prose()
    # The words of `_cwe_words` in a permutation of all words: the random draws stay those of a
    # sample drawn before the words of the prefix were left out.
    chosen = [words[i] for i in rng.permutation(len(words)) if words[i] not in CWE_PREFIX][: CWE_COMMON + units]
    common, rare = chosen[:CWE_COMMON], chosen[CWE_COMMON:]
    entries = common * max(CWE_COMMON_FREQ, units) + rare * CWE_RARE_FREQ
    entries = [entries[i] for i in rng.permutation(len(entries))]
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
    user = (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            f"ones that appear most often.\n{listing}\nQuestion: What are the {CWE_COMMON} most common words in "
            "the above list?")
    return Parts(user, CWE_PREFIX, tuple(common))


FWE_TOP, FWE_ALPHA, FWE_VOCAB = 3, 2.0, 400


def _frequent_words(rng: np.random.Generator, units: int) -> Parts:
    """`units` coded words drawn from a Zipf(alpha=2) law over FWE_VOCAB random 4-6 letter codes."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = _distinct(lambda: "".join(rng.choice(letters, rng.integers(4, 7))), FWE_VOCAB)
    weights = 1.0 / np.arange(1, FWE_VOCAB + 1) ** FWE_ALPHA
    draws = rng.choice(FWE_VOCAB, units, p=weights / weights.sum())
    counts = np.bincount(draws, minlength=FWE_VOCAB)
    top = sorted(range(FWE_VOCAB), key=lambda i: (-counts[i], i))[:FWE_TOP]
    text = " ".join(vocab[i] for i in draws)
    user = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            f"frequently appeared coded words.\n{text}\nQuestion: Do not provide any explanation. What are the "
            "three most frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Parts(user, prefix, tuple(vocab[i] for i in top))


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: `build(rng, units) -> Parts` (the haystack grows with `units`, at most
    `max_units()` when given) and its decode length."""

    build: Callable[[np.random.Generator, int], Parts]
    max_new_tokens: int
    max_units: Callable[[], int] | None = None


TASKS: dict[str, Task] = {
    "niah_single": Task(functools.partial(_niah, keys=1, values_per_key=1, queries=1), 16),
    "niah_multikey": Task(functools.partial(_niah, keys=4, values_per_key=1, queries=1), 16),
    "niah_multivalue": Task(functools.partial(_niah, keys=1, values_per_key=4, queries=1), 48),
    "niah_multiquery": Task(functools.partial(_niah, keys=2, values_per_key=1, queries=2), 32),
    "variable_tracking": Task(_variable_tracking, 32),
    "common_words": Task(_common_words, 32, max_units=lambda: len(_cwe_words()) - CWE_COMMON),
    "frequent_words": Task(_frequent_words, 24),
}


# ------------------------------------------------------------------------------------- samples


def prompt_tokens(tokenizer, parts: Parts) -> list[int]:
    """The user message in the chat template (when the tokenizer has one), then the answer prefix."""
    if tokenizer.chat_template is not None:
        text = tokenizer.render_chat([{"role": "user", "content": parts.user}]) + parts.answer_prefix
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"{parts.user}\n{parts.answer_prefix}", add_special_tokens=True)


def make_sample(task: str, tokenizer, length: int, index: int, seed: int = 0) -> Sample:
    """The `index`-th sample of `task` whose prompt holds at most `length` tokens, as long as the
    haystack's units allow (the largest haystack that fits, found by bisection)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    spec = TASKS[task]
    entropy = [seed, index, length, zlib.crc32(task.encode())]

    def build(units: int) -> tuple[list[int], Parts]:
        parts = spec.build(np.random.default_rng(entropy), units)
        return prompt_tokens(tokenizer, parts), parts

    lo, hi = 0, 16  # invariant: `lo` units fit, `hi` units do not
    if len(build(lo)[0]) > length:
        raise ValueError(f"{task}: even an empty haystack takes {len(build(lo)[0])} tokens, more than {length}")
    cap = spec.max_units() if spec.max_units else None
    while len(build(hi)[0]) <= length:
        if cap is not None and hi >= cap:
            raise ValueError(f"{task}: its text runs out ({cap} units) before {length} tokens; use a shorter length")
        lo, hi = hi, 2 * hi if cap is None else min(2 * hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(build(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid
    tokens, parts = build(lo)
    return Sample(task, length, index, tuple(tokens), parts.answers, spec.max_new_tokens)


def make_samples(task: str, tokenizer, length: int, count: int, seed: int = 0) -> list[Sample]:
    return [make_sample(task, tokenizer, length, i, seed) for i in range(count)]


def score(prediction: str, answers) -> float:
    """RULER's string_match_all for one sample: the share of `answers` found in `prediction`
    (case-insensitive substrings), in [0, 1]."""
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)
