"""The embedded tokenizer: a WordLevel vocabulary trained offline with ``tokenizers``.

Whitespace-separated words are tokens, which suits the synthetic tasks exactly (one symbol, one
token) and keeps the demo free of any download. Special tokens come first, in a fixed order:
``<pad>`` 0, ``<eos>`` 1, ``<mask>`` 2, ``<slack>`` 3, ``<unk>`` 4. The vocabulary is then ordered by
frequency (ties broken by the trainer's stable order), so the same data gives the same ids; the
tokenizer is cached in the run folder together with a fingerprint of its training data, and a cached
copy is reused only when the fingerprint matches.

A simple chat template (``role : content`` turns, then ``assistant :``) is attached so that chat
``messages`` data also works with the embedded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

SPECIAL_TOKENS = ("<pad>", "<eos>", "<mask>", "<slack>", "<unk>")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
_FINGERPRINT_FILE = "mdlm_ctc_tokenizer.json"


def _fingerprint(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v1|{vocab_size}|".encode())
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (whitespace words, WordLevel)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))
    corpus = list(texts) + [CHAT_TEMPLATE_WORDS]
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  mask_token="<mask>", unk_token="<unk>", additional_special_tokens=["<slack>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


CHAT_TEMPLATE_WORDS = "user assistant system :"


def load_or_train_tokenizer(texts, vocab_size: int, folder: str):
    """Reuse ``folder`` when it holds a tokenizer trained on the same texts; otherwise train and save it."""
    from transformers import AutoTokenizer

    texts = list(texts)
    fingerprint = _fingerprint(texts, vocab_size)
    marker = os.path.join(folder, _FINGERPRINT_FILE)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("fingerprint") == fingerprint:
                return AutoTokenizer.from_pretrained(folder)
    tok = train_tokenizer(texts, vocab_size)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, _FINGERPRINT_FILE), "w") as f:
        json.dump({"fingerprint": fingerprint, "vocab_size": vocab_size, "trained_on": len(texts)}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return AutoTokenizer.from_pretrained(folder)
