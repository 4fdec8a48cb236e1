"""Built-in deterministic synthetic tasks: a base-skill mixture and a stream of domain tasks over it.

Why these tasks look the way they do (measured on char-level Llamas of 0.8–2M parameters; the README's
"What the method does here" has the numbers):
tasks a tiny model learns *from scratch* (2-digit addition, reversal, new facts) are wiped out by the
next fine-tuning stage whatever the method, so they cannot show a difference between continual-
learning methods. What does is a base model that has *mastered* a few skills, followed by a stream of
**new formats over those skills**: each stage only has to learn a new way of asking for something
the model already knows, which it learns in ~150 steps, and which the next stage's format partly
overwrites — clear but partial forgetting, the regime a forgetting benchmark needs.

Base skills (``synthetic:general``, the pretraining mixture; ``Example.meta["skill"]``):

* ``copy``  — ``copy qxm:`` → ``qxm``: attend to and reproduce a span.
* ``sort``  — ``sort dbca:`` → ``abcd``: a per-character algorithm over a span.
* ``fact``  — ``xyz=`` → ``klm``: recall from a FIXED table of key–value facts (seeded once, the same
  in every run and every task), i.e. memory stored in the weights.
* ``add``   — ``3+4=`` → ``7``: one-digit addition, all 100 sums.
* ``trace`` — ``x=5;y=x;print y`` → ``5`` and ``x=5;y=2;print x`` → ``5``: short variable binding.

Domain tasks (one new format each, ``meta["skill"]`` names the skill it rides on):

* ``math``    — ``sum 3 4=`` → ``7`` over ``add``. Trained on half the digit pairs, evaluated on
  the other half: a model can only score on held-out pairs by routing the new format into the
  addition it already has, not by memorising 50 new strings.
* ``math2``   — ``3 plus 4=`` → ``7``: an in-domain variant of ``math`` (same skill, same held-out
  pairs, another surface form), for longer streams that revisit a domain.
* ``medical`` — ``dx xyz?`` → ``klm`` over ``fact``: a query format over the known fact table,
  trained on half the keys, evaluated on the held-out half (known to the base only as ``xyz=``).
* ``legal``   — ``case xyz:`` → ``klm``: another format over the same facts (same split), so a
  legal stage competes with a medical one for the same memory.
* ``code``    — ``print(3+4)`` → ``7`` over ``add``: a Python print of an expression over mastered
  addition, on the same held-out pairs as ``math`` (trained on the other half). Why ``add``: it is one
  of the two base skills (with ``fact``) that BOTH demo models master — measured on the demo pair
  (pretrained with the demo preset, 50 eval items per skill), base accuracy source/target: copy
  1.00/0.56, sort 0.96/0.38, fact 1.00/1.00, add 1.00/1.00, trace 0.44/0.60; the BPE target's tokens
  hide the characters that copy and sort act on. One stage of full fine-tuning (80 steps, lr 3e-4,
  batch 32) took this task from 0 to 100 % on the source and from 14 to 76 % on the target (12 → 80 %
  as the third stage after math and medical), where the earlier formats did not reach 40 % on both:
  ``sorted('dbca')`` → ``abcd`` over ``sort`` (source 0 → 80 %, target 0 → 34 %; 14 % in the demo),
  ``print('qxm')`` → ``qxm`` over ``copy`` (0 → 36 % / 0 → 72 %), ``d['xyz']`` over ``fact`` (target
  started at 25 %), and the first lookup over ``trace`` (``a=3;b=7;a?``), which the base already
  scored ~35 % on and no method moved.

``synthetic:general`` evaluates all five skills in equal shares (its score is the macro average), and
``synthetic:general?skills=add`` (or ``skills=add,fact``) restricts a task to some skills, so a
benchmark can report the base-skill drop per skill. For ``fact`` and ``add`` the eval items are the
same ones trained on: the finite table *is* the skill being measured for retention.

Every task is a pure function of its parameters: ``n_train``, ``n_eval``, ``seed`` (and ``skills``).
Strings are short (≤ 20 characters with the answer) so ``seq_len`` 32 fits everything under the char
tokenizer. Training sets over finite spaces are drawn with replacement (a stage of 150 steps × 32
needs more examples than 50 digit pairs).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from trace_transfer.data._example import Example
from trace_transfer.errors import ConfigError

__all__ = ["available_synthetic", "describe", "fact_table", "generate", "parse_ref", "corpus", "SKILLS"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The fact table is fixed across runs and tasks: the base memorises it once, the domain tasks query it.
_FACT_SEED = 20260101
N_FACTS = 80
# Split of digit pairs and fact keys between the domain tasks' train and eval sides, fixed too.
_SPLIT_SEED = 7
SKILLS = ("copy", "sort", "fact", "add", "trace")


@functools.cache
def fact_table() -> tuple[tuple[str, str], ...]:
    """The fixed ``(key, value)`` table: 3-letter keys and values, all distinct, keys ∩ values = ∅."""
    rng = random.Random(_FACT_SEED)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < 2 * N_FACTS:
        w = "".join(rng.choice(_LETTERS) for _ in range(3))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(zip(words[:N_FACTS], words[N_FACTS:]))


@functools.cache
def _split(kind: str) -> tuple[tuple, tuple]:
    """Fixed (train, eval) halves of the digit pairs or the fact table."""
    items: list[Any] = [(a, b) for a in range(10) for b in range(10)] if kind == "pairs" else list(fact_table())
    random.Random(f"{_SPLIT_SEED}:{kind}").shuffle(items)
    half = len(items) // 2
    return tuple(items[:half]), tuple(items[half:])


# --------------------------------------------------------------------------------------------------
# Formats: how an item of a skill becomes (prompt, response)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Format:
    """One prompt format over one skill.

    Either ``draw`` samples items from an open space (then eval prompts are excluded from training),
    or ``train_space``/``eval_space`` list a finite space.
    """

    skill: str
    render: Callable[[Any], tuple[str, str]]
    draw: Callable[[random.Random], Any] | None = None
    train_space: Callable[[], tuple] | None = None
    eval_space: Callable[[], tuple] | None = None
    weight: float = 1.0  # share in a mixture's training draw


def _word(rng: random.Random, lo: int = 2, hi: int = 5) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _draw_trace(rng: random.Random) -> tuple:
    names = rng.sample(_LETTERS, rng.randint(2, 3))
    return tuple((n, rng.randrange(10)) for n in names), rng.randrange(len(names))


def _render_trace(item: tuple) -> tuple[str, str]:
    binds, q = item
    return ";".join(f"{n}={v}" for n, v in binds) + f";print {binds[q][0]}", str(binds[q][1])


# The base learns each fact under several query forms, so that what it stores is the fact, not one
# string: a model trained on one form only memorises a *new* form's training keys from scratch and
# scores ~0.2 on held-out keys (measured, d=128): a task learned from scratch, which the next stage wipes out.
_FACT_FORMS = ("{}=", "{}->", "[{}]")


def _fact_space() -> tuple:
    return tuple((k, v, form) for k, v in fact_table() for form in _FACT_FORMS)


def _all_pairs() -> tuple:
    return tuple((a, b) for a in range(10) for b in range(10))


_BASE = {
    "copy": _Format("copy", lambda s: (f"copy {s}:", s), draw=_word),
    "sort": _Format("sort", lambda s: (f"sort {s}:", "".join(sorted(s))), draw=_word),
    "fact": _Format("fact", lambda kvf: (kvf[2].format(kvf[0]), kvf[1]), train_space=_fact_space,
                    eval_space=_fact_space),
    "add": _Format("add", lambda ab: (f"{ab[0]}+{ab[1]}=", str(ab[0] + ab[1])), train_space=_all_pairs,
                   eval_space=_all_pairs),
    # Lookup is the slowest skill to learn (it needs an induction-style head), hence the double share.
    "trace": _Format("trace", _render_trace, draw=_draw_trace, weight=2.0),
}


def _pairs_train() -> tuple:
    return _split("pairs")[0]


def _pairs_eval() -> tuple:
    return _split("pairs")[1]


def _facts_train() -> tuple:
    return _split("facts")[0]


def _facts_eval() -> tuple:
    return _split("facts")[1]


@dataclass(frozen=True)
class _TaskDef:
    name: str
    summary: str
    formats: tuple[_Format, ...]
    n_train: int
    n_eval: int


# Defaults: a domain stage of 3 epochs at batch 32 is 150 steps (the measured regime); the general
# mixture is large enough for ~2,500 pretraining steps at batch 32 without repeating an example.
_TASKS: dict[str, _TaskDef] = {
    "general": _TaskDef("general", "base-skill mixture: copy, sort, fact recall, 1-digit addition, code tracing",
                        tuple(_BASE[s] for s in SKILLS), n_train=80_000, n_eval=250),
    "math": _TaskDef("math", "'sum 3 4=' -> '7': a new format over mastered addition",
                     (_Format("add", lambda ab: (f"sum {ab[0]} {ab[1]}=", str(ab[0] + ab[1])),
                              train_space=_pairs_train, eval_space=_pairs_eval),), n_train=1600, n_eval=200),
    "math2": _TaskDef("math2", "'3 plus 4=' -> '7': an in-domain variant of math",
                      (_Format("add", lambda ab: (f"{ab[0]} plus {ab[1]}=", str(ab[0] + ab[1])),
                               train_space=_pairs_train, eval_space=_pairs_eval),), n_train=1600, n_eval=200),
    "medical": _TaskDef("medical", "'dx xyz?' -> 'klm': a query format over the known fact table",
                        (_Format("fact", lambda kv: (f"dx {kv[0]}?", kv[1]), train_space=_facts_train,
                                 eval_space=_facts_eval),), n_train=1600, n_eval=200),
    "legal": _TaskDef("legal", "'case xyz:' -> 'klm': another format over the same facts",
                      (_Format("fact", lambda kv: (f"case {kv[0]}:", kv[1]), train_space=_facts_train,
                               eval_space=_facts_eval),), n_train=1600, n_eval=200),
    "code": _TaskDef("code", "'print(3+4)' -> '7': a Python print over mastered addition",
                     (_Format("add", lambda ab: (f"print({ab[0]}+{ab[1]})", str(ab[0] + ab[1])),
                              train_space=_pairs_train, eval_space=_pairs_eval),), n_train=1600, n_eval=200),
}
_PARAMS = {"n_train": int, "n_eval": int, "seed": int, "skills": str}


def available_synthetic() -> list[str]:
    """Names usable as ``synthetic:<name>``."""
    return list(_TASKS)


def describe(name: str) -> str:
    return _task_def(name).summary


def _task_def(name: str) -> _TaskDef:
    if name not in _TASKS:
        raise ConfigError(f"unknown synthetic task {name!r}; available: {', '.join('synthetic:' + n for n in _TASKS)}")
    return _TASKS[name]


def parse_ref(ref: str) -> tuple[str, dict[str, Any]]:
    """``"synthetic:math?n_train=500&seed=1"`` → ``("math", {"n_train": 500, "seed": 1})``.

    Raises:
        ConfigError: unknown task, unknown parameter or a value of the wrong type — all listed.
    """
    body = ref.removeprefix("synthetic:")
    name, _, query = body.partition("?")
    _task_def(name)
    params: dict[str, Any] = {}
    problems = []
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in _PARAMS:
            problems.append(f"unknown parameter {key!r}; valid: {', '.join(_PARAMS)}")
            continue
        try:
            params[key] = _PARAMS[key](value)
        except ValueError:
            problems.append(f"parameter {key}={value!r} is not an {_PARAMS[key].__name__}")
    if query and not params and not problems:
        problems.append(f"could not parse parameters {query!r}; write e.g. ?n_train=500&seed=1")
    if problems:
        raise ConfigError(f"synthetic task reference {ref!r} is invalid", problems)
    check_params(name, params)
    return name, params


def check_params(name: str, params: dict[str, Any]) -> None:
    """Validate parameters of synthetic task ``name`` (all problems at once)."""
    task = _task_def(name)
    problems = []
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        problems.append(f"unknown parameter(s) {unknown}; valid: {', '.join(_PARAMS)}")
    for key in ("n_train", "n_eval"):
        if key in params and (not isinstance(params[key], int) or params[key] < 1):
            problems.append(f"{key} must be a positive integer, got {params[key]!r}")
    if "skills" in params:
        have = [f.skill for f in task.formats]
        wanted = _skills(params["skills"])
        bad = [s for s in wanted if s not in have]
        if bad or not wanted:
            problems.append(f"skills {params['skills']!r}: task {name!r} has skills {', '.join(have)}")
    if problems:
        raise ConfigError(f"synthetic:{name} parameters are invalid", problems)


def _skills(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def task_name(name: str, params: dict[str, Any]) -> str:
    """Display name: the task name, suffixed by its skills filter (``general-add``) when there is one."""
    return name + ("-" + "+".join(_skills(params["skills"])) if params.get("skills") else "")


def defaults(name: str) -> dict[str, int]:
    t = _task_def(name)
    return {"n_train": t.n_train, "n_eval": t.n_eval, "seed": 0}


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate(name: str, params: dict[str, Any] | None = None, train: bool = True) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` examples of synthetic task ``name``; a pure function of ``params``.

    ``train=False`` skips drawing the training side (returned empty): evaluation alone is cheap.

    Eval items are spread evenly over the task's formats (skills). Open spaces: eval prompts are
    unique and never appear in training. Finite spaces: eval is the eval space (sampled down to the
    share if larger); training draws from the train space with replacement.
    """
    params = dict(params or {})
    check_params(name, params)
    task = _task_def(name)
    seed = params.get("seed", 0)
    n_train = params.get("n_train", task.n_train)
    n_eval = params.get("n_eval", task.n_eval)
    formats = task.formats
    if params.get("skills"):
        wanted = _skills(params["skills"])
        formats = tuple(f for f in formats if f.skill in wanted)
    label = task_name(name, params)

    def example(fmt: _Format, item: Any) -> Example:
        prompt, response = fmt.render(item)
        return Example(prompt=prompt, response=response, meta={"task": label, "skill": fmt.skill})

    eval_rng = random.Random(f"{name}:eval:{seed}")
    eval_examples: list[Example] = []
    held_out: set[str] = set()
    for i, fmt in enumerate(formats):
        share = n_eval // len(formats) + (1 if i < n_eval % len(formats) else 0)
        for item in _eval_items(fmt, share, eval_rng):
            ex = example(fmt, item)
            eval_examples.append(ex)
            held_out.add(ex.prompt)

    if not train:
        return [], eval_examples
    train_rng = random.Random(f"{name}:train:{seed}")
    weights = [f.weight for f in formats]
    train_examples: list[Example] = []
    while len(train_examples) < n_train:
        fmt = train_rng.choices(formats, weights)[0]
        if fmt.draw is not None:
            ex = example(fmt, fmt.draw(train_rng))
            if ex.prompt in held_out:
                continue
        else:
            ex = example(fmt, train_rng.choice(fmt.train_space()))
        train_examples.append(ex)
    return train_examples, eval_examples


def _eval_items(fmt: _Format, n: int, rng: random.Random) -> list[Any]:
    if fmt.draw is None:
        space = list(fmt.eval_space())
        return space if n >= len(space) else rng.sample(space, n)
    items, seen, tries = [], set(), 0
    while len(items) < n and tries < 100 * n + 1000:
        tries += 1
        item = fmt.draw(rng)
        prompt = fmt.render(item)[0]
        if prompt not in seen:
            seen.add(prompt)
            items.append(item)
    return items


def corpus(n_per_task: int = 600, seed: int = 0) -> Iterator[str]:
    """Prompt + response texts of every synthetic task (training side): text to fit a tiny BPE on."""
    for name in _TASKS:
        train, _ = generate(name, {"n_train": n_per_task, "n_eval": 1, "seed": seed})
        for ex in train:
            yield ex.prompt + ex.response
