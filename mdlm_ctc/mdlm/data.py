"""Data: JSONL files, the embedded synthetic tasks, tokenisation and the global batch order.

**Files.** One JSON object per line, either ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the assistant's answer
(the earlier ones become the prompt through the tokenizer's chat template). Extra keys are kept
(``task`` is used to break metrics down). A malformed line stops the run with its line number, or is
skipped and counted with ``--skip-bad``. Blank lines are ignored.

**Embedded synthetic data** (seeded, generated in memory; no download). Each task stresses one
thing a positional loss may get wrong:

* ``copy``     ``copy : a c b _ _``         -> ``a c b``
* ``reverse``  ``reverse : _ _ a c b``      -> ``b c a`` (position-sensitive)
* ``expand``   ``expand : 1 0 *3 5 _``      -> ``1 0 0 0 5`` (numbers with runs of equal digits: the
  "dropped trailing zeros" failure of a repeat-merging collapse)
* ``insert``   ``insert x 1 : a c b _``     -> ``a x c b`` (insert, then copy: a mid-sequence shift)
* ``dedup``    ``dedup : a a c c c``        -> ``a c`` (answer length not given by the prompt)

Lengths vary per example between ``synthetic_min_len`` and ``synthetic_max_len``. Each task's input
sits in a fixed-width field (``synthetic_max_len`` slots, filled with ``_``; right-aligned for
``reverse``), so copy, reverse and the copy part of insert have a fixed offset between an answer
position and its source. Without the field a tiny RoPE model has to learn to count, which it does not
within a CPU budget of a few thousand steps (measured: ~0 exact match for CE after 1,500 steps); with
it, the alignment-free part is learnable while ``expand``, ``dedup`` and the shifted tail of
``insert`` still need variable alignments. The field is a property of the task, identical for every
objective. The evaluation set uses another seed stream and keeps only prompts that never occur in the
training set. The task mix is uniform and nothing in it was tuned toward either objective.

**Order.** The training stream is the concatenation of seeded permutations of the data (one per
epoch); the rows of step ``s`` are positions ``[s*G, (s+1)*G)`` of that stream, so the order depends
only on the seed, never on the number of processes, and a resumed run picks up exactly where it
stopped. Every row also gets a noise seed derived from (seed, step, position in the global batch):
masking noise is independent of how the batch is split across processes and micro-batches.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch

SYNTHETIC_TASKS = ("copy", "reverse", "expand", "insert", "dedup")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
FILLER = "_"


class DataError(ValueError):
    """A malformed data file (the message names the file and line)."""


@dataclass
class Example:
    """One training or evaluation example, before tokenisation."""

    response: str
    prompt: str | None = None
    messages: list | None = None  # chat form: the last message is the answer
    task: str | None = None

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "response": self.response} if self.messages is None else \
            {"messages": self.messages}
        if self.task is not None:
            out["task"] = self.task
        return out


@dataclass
class Encoded:
    """An example as token ids: the prompt (never masked) and the answer (with its terminator, if any;
    without EOS)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    task: str | None = None
    index: int = 0
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ JSONL
def _parse_record(obj, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object; got {type(obj).__name__}")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: `task` must be a string; got {task!r}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: `messages` must be a list of at least 2 messages (prompt turns, then "
                            f"the assistant's answer)")
        for i, msg in enumerate(messages):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] must be an object with string `role` and `content`; "
                                f"got {msg!r}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (the answer); got "
                            f"{messages[-1]['role']!r}")
        return Example(response=messages[-1]["content"], messages=messages, task=task)
    prompt, response = obj.get("prompt"), obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: expected string fields `prompt` and `response` (or a `messages` list); got "
                        f"keys {sorted(obj)}")
    return Example(response=response, prompt=prompt, task=task)


def read_jsonl(path: str, skip_bad: bool = False) -> tuple[list[Example], int]:
    """Read a data file; returns (examples, number of skipped malformed lines)."""
    examples: list[Example] = []
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
                examples.append(_parse_record(obj, where))
            except DataError as err:
                if not skip_bad:
                    raise DataError(f"{err} (use --skip-bad to skip and count malformed lines)") from None
                skipped += 1
    if not examples:
        raise DataError(f"{path}: no usable examples ({skipped} malformed lines skipped)")
    return examples, skipped


def write_jsonl(examples: list[Example], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json()) + "\n")


# ------------------------------------------------------------------------------ synthetic tasks
def _symbols(rng: random.Random, n: int, alphabet: str) -> list[str]:
    return [rng.choice(alphabet) for _ in range(n)]


def _field(tokens: list[str], width: int, right: bool = False) -> list[str]:
    """Place ``tokens`` in a fixed-width input field padded with the filler ``_``."""
    fill = [FILLER] * max(width - len(tokens), 0)
    return fill + tokens if right else tokens + fill


def synthetic_example(task: str, rng: random.Random, min_len: int, max_len: int, alphabet_size: int) -> Example:
    alphabet = LETTERS[:alphabet_size]
    if task == "copy":
        xs = _symbols(rng, rng.randint(min_len, max_len), alphabet)
        return Example(prompt="copy : " + " ".join(_field(xs, max_len)), response=" ".join(xs), task=task)
    if task == "reverse":
        xs = _symbols(rng, rng.randint(min_len, max_len), alphabet)
        return Example(prompt="reverse : " + " ".join(_field(xs, max_len, right=True)),
                       response=" ".join(reversed(xs)), task=task)
    if task == "expand":
        n = rng.randint(min_len, max_len)
        digits, prompt, previous = [], [], None
        while len(digits) < n:
            d = rng.choice([c for c in "0123456789" if c != previous])
            run = 1 if rng.random() < 0.4 else rng.randint(2, 5)
            run = min(run, n - len(digits))
            digits += [d] * run
            prompt += [d] if run == 1 else [d, f"*{run}"]
            previous = d
        return Example(prompt="expand : " + " ".join(_field(prompt, max_len)), response=" ".join(digits), task=task)
    if task == "insert":
        n = rng.randint(max(min_len - 1, 1), max(max_len - 1, 1))
        xs = _symbols(rng, n, alphabet)
        k = rng.randint(0, n)
        x = rng.choice(alphabet)
        ys = xs[:k] + [x] + xs[k:]
        return Example(prompt=f"insert {x} {k} : " + " ".join(_field(xs, max_len - 1)), response=" ".join(ys),
                       task=task)
    if task == "dedup":
        n = rng.randint(min_len, max_len)
        xs, previous = [], None
        while len(xs) < n:
            s = rng.choice([c for c in alphabet if c != previous])
            xs += [s] * min(rng.randint(1, 3), n - len(xs))
            previous = s
        ys = [s for i, s in enumerate(xs) if i == 0 or s != xs[i - 1]]
        return Example(prompt="dedup : " + " ".join(_field(xs, max_len)), response=" ".join(ys), task=task)
    raise ValueError(f"`synthetic_tasks` has an unknown task {task!r}; known: {', '.join(SYNTHETIC_TASKS)}")


def synthetic_dataset(n: int, seed: int, tasks, min_len: int, max_len: int, alphabet_size: int,
                      exclude_prompts: set | None = None, unique: bool = False) -> list[Example]:
    """``n`` examples, tasks drawn uniformly; optionally without prompts in ``exclude_prompts``."""
    rng = random.Random(seed)
    seen = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct held-out synthetic examples; increase "
                             f"`synthetic_max_len` or `synthetic_alphabet`, or lower `synthetic_eval_size`")
        ex = synthetic_example(rng.choice(list(tasks)), rng, min_len, max_len, alphabet_size)
        if exclude_prompts is not None and ex.prompt in exclude_prompts:
            continue
        if unique:
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
        out.append(ex)
    return out


def embedded_datasets(cfg) -> tuple[list[Example], list[Example]]:
    """The embedded training and held-out evaluation sets for this config (seeded)."""
    d = cfg.data
    tasks = cfg.synthetic_task_list()
    train = synthetic_dataset(d.synthetic_train_size, cfg.run.seed * 2 + 11, tasks, d.synthetic_min_len,
                              d.synthetic_max_len, d.synthetic_alphabet)
    held_out = synthetic_dataset(d.synthetic_eval_size, cfg.run.seed * 2 + 12, tasks, d.synthetic_min_len,
                                 d.synthetic_max_len, d.synthetic_alphabet,
                                 exclude_prompts={ex.prompt for ex in train}, unique=True)
    return train, held_out


def load_validation(cfg, train: list[Example], evals: list[Example]) -> tuple[list[Example], str]:
    """The validation split (``val_file``, or embedded examples whose prompts are in neither the training
    nor the evaluation set) and a description of its source."""
    d = cfg.data
    if d.val_file is not None:
        return read_jsonl(d.val_file, d.skip_bad)[0], d.val_file
    if d.train_file is not None:
        raise ValueError("`val_file` is required with a `train_file` (settings are chosen on a validation split, "
                         "never on the evaluation set)")
    exclude = {ex.prompt for ex in train} | {ex.prompt for ex in evals}
    val = synthetic_dataset(d.synthetic_val_size, cfg.run.seed * 2 + 13, cfg.synthetic_task_list(), d.synthetic_min_len,
                            d.synthetic_max_len, d.synthetic_alphabet, exclude_prompts=exclude, unique=True)
    return val, "embedded synthetic (held out from training and evaluation)"


def load_datasets(cfg, need_train: bool = True) -> tuple[list[Example], list[Example], dict]:
    """(train, eval, info) from the configured files or the embedded generator."""
    d = cfg.data
    info = {"skipped_train_lines": 0, "skipped_eval_lines": 0}
    emb_train = emb_eval = None
    if d.train_file is None or d.eval_file is None:
        emb_train, emb_eval = embedded_datasets(cfg)
    if d.train_file is not None:
        train, info["skipped_train_lines"] = read_jsonl(d.train_file, d.skip_bad) if need_train else ([], 0)
    else:
        train = emb_train
    if d.eval_file is not None:
        evals, info["skipped_eval_lines"] = read_jsonl(d.eval_file, d.skip_bad)
    else:
        evals = emb_eval
    info["train_source"] = d.train_file or "embedded synthetic"
    info["eval_source"] = d.eval_file or "embedded synthetic (held out)"
    return train, evals, info


def tokenizer_corpus(examples: list[Example]):
    """Texts to train the embedded tokenizer on (prompts, answers and chat turns)."""
    for ex in examples:
        if ex.messages is not None:
            for msg in ex.messages:
                yield f"{msg['role']} : {msg['content']}"
        else:
            yield ex.prompt
            yield ex.response


# ------------------------------------------------------------------------------ tokenisation
def _prompt_ids(tokenizer, ex: Example, wrap_chat: bool) -> list[int]:
    if ex.messages is not None or wrap_chat:
        messages = ex.messages[:-1] if ex.messages is not None else [{"role": "user", "content": ex.prompt}]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the data has chat `messages` (or `wrap_chat` is on) but the tokenizer has no chat "
                             "template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(ex.prompt)["input_ids"])


def encode_examples(examples: list[Example], tokenizer, *, max_length: int, too_long: str = "drop",
                    wrap_chat: bool = False, min_canvas: int = 1,
                    answer_end=()) -> tuple[list[Encoded], int]:
    """Tokenise; returns (encoded, number dropped for being too long).

    ``answer_end``: ids that close every answer before its EOS padding (``SpecialIds.answer_end``,
    LLaDA-8B-Instruct's ``<|eot_id|>``); they become part of ``answer_ids``. A row needs
    ``len(prompt) + len(answer) + 1 <= max_length`` (the answer is followed by one EOS) and at least
    ``min_canvas`` canvas positions after the prompt.
    """
    out: list[Encoded] = []
    dropped = 0
    for i, ex in enumerate(examples):
        prompt = _prompt_ids(tokenizer, ex, wrap_chat)
        answer = list(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + list(answer_end)
        need = len(prompt) + max(len(answer) + 1, min_canvas)
        if need > max_length:
            if too_long == "error":
                raise ValueError(f"example {i} needs {need} tokens (prompt {len(prompt)}, answer {len(answer)} + "
                                 f"EOS) but `max_length` is {max_length}; raise max_length or use --too-long drop")
            dropped += 1
            continue
        out.append(Encoded(prompt_ids=prompt, answer_ids=answer, task=ex.task, index=i))
    if not out:
        raise ValueError(f"every example is longer than `max_length` ({max_length}); raise it")
    return out, dropped


# ------------------------------------------------------------------------------ order and batches
_MASK64 = (1 << 63) - 1


def noise_seed(seed: int, step: int, position: int) -> int:
    """The masking-noise seed of row ``position`` of the global batch of ``step`` (split-independent)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB + 0x2545F491) & _MASK64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK64
    x ^= x >> 29
    return x & _MASK64


class GlobalOrder:
    """Which examples form the global batch of each step: seeded per-epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        out = []
        for q in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self._perm(q // self.n)[q % self.n])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n
