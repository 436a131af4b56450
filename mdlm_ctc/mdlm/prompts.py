"""Prompts typed by hand for ``mdlm-ctc sample``: the embedded tasks' format, and words the model never saw.

The embedded synthetic tasks (``data``) read their input from a fixed-width field of ``synthetic_max_len``
slots filled with ``_`` (right-aligned for ``reverse``; ``synthetic_max_len - 1`` slots for ``insert``),
and the model has only ever seen prompts in that form: ``copy : a b c`` is another input than
``copy : a b c _ _ _ _ _ _ _``. :func:`synthetic_prompt` writes a task prompt in the training form, and
:func:`unknown_words` finds the words a word-level tokenizer would turn into ``<unk>``.
"""

from __future__ import annotations

from .data import FILLER, SYNTHETIC_TASKS, _field

FORMATS = {
    "copy": "copy : a c b",
    "reverse": "reverse : a c b",
    "expand": "expand : 1 0 *3 5",
    "insert": "insert x 1 : a c b",
    "dedup": "dedup : a a c c c",
}


def prompt_help(max_len: int) -> str:
    """The embedded tasks' prompt formats in words."""
    return (f"the embedded model's prompts are its tasks' inputs, symbols separated by spaces: "
            + "; ".join(f"`{example}`" for example in FORMATS.values())
            + f" (at most {max_len} symbols, {max_len - 1} for insert; the fixed-width field of `{FILLER}` the "
              f"model was trained on is added)")


def synthetic_prompt(prompt: str, max_len: int) -> str:
    """``prompt`` in the training form when it is an embedded task's prompt (its field filled with ``_`` to
    ``max_len`` slots), else unchanged. Raises ``ValueError`` for a task prompt that cannot be one."""
    words = prompt.split()
    if not words or words[0] not in SYNTHETIC_TASKS:
        return prompt
    task = words[0]
    head = 4 if task == "insert" else 2  # "insert x k :" or "copy :"
    if len(words) < head or words[head - 1] != ":":
        raise ValueError(f"`prompt` {prompt!r} is not a {task} prompt; write it like {FORMATS[task]!r}")
    symbols = [w for w in words[head:] if w != FILLER]
    width = max_len - 1 if task == "insert" else max_len
    if len(symbols) > width:
        raise ValueError(f"`prompt` {prompt!r}: a {task} prompt holds at most {width} symbols (synthetic_max_len "
                         f"{max_len}); got {len(symbols)}")
    return " ".join(words[:head] + _field(symbols, width, right=task == "reverse"))


def unknown_words(prompt: str, tokenizer) -> list[str]:
    """Whitespace-separated words of ``prompt`` that the tokenizer maps to its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    out = []
    for word in prompt.split():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if unk in ids and word not in out:
            out.append(word)
    return out
