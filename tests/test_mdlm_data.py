"""Data: the embedded synthetic tasks, JSONL parsing (malformed lines), tokenizer, batch order."""

import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from mdlm_ctc.cli import main  # noqa: E402
from mdlm_ctc.mdlm.config import Config  # noqa: E402
from mdlm_ctc.mdlm.data import (DataError, Example, GlobalOrder, embedded_datasets,  # noqa: E402
                                encode_examples, noise_seed, read_jsonl, synthetic_example, tokenizer_corpus)
from mdlm_ctc.mdlm.tokenizer import (SPECIAL_TOKENS, load_or_train_tokenizer,  # noqa: E402
                                     train_tokenizer)


def _expand(prompt_tokens):
    out = []
    for tok in prompt_tokens:
        if tok.startswith("*"):
            out += [out[-1]] * (int(tok[1:]) - 1)
        else:
            out.append(tok)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_synthetic_tasks_are_correct(seed):
    rng = random.Random(seed)
    for _ in range(50):
        for task in ("copy", "reverse", "expand", "insert", "dedup"):
            ex = synthetic_example(task, rng, 2, 12, 16)
            head, body = ex.prompt.split(" : ")
            field = body.split()
            assert len(field) == (11 if task == "insert" else 12)  # a fixed-width input field
            xs, ys = [t for t in field if t != "_"], ex.response.split()
            assert 1 <= len(ys) <= 12
            if task == "reverse":
                assert field[-len(xs):] == xs  # right-aligned
            else:
                assert field[: len(xs)] == xs
            if task == "copy":
                assert ys == xs
            elif task == "reverse":
                assert ys == xs[::-1]
            elif task == "expand":
                assert ys == _expand(xs) and all(y.isdigit() for y in ys)
            elif task == "insert":
                _, x, k = head.split()
                assert ys == xs[: int(k)] + [x] + xs[int(k):]
            else:
                assert ys == [s for i, s in enumerate(xs) if i == 0 or s != xs[i - 1]]


def test_expand_has_runs_of_equal_digits():
    rng = random.Random(0)
    runs = [synthetic_example("expand", rng, 2, 12, 16).response.split() for _ in range(200)]
    assert any(any(r[i] == r[i + 1] == r[i + 2] for i in range(len(r) - 2)) for r in runs)


def test_embedded_data_is_seeded_and_held_out():
    cfg = Config.from_dict({"synthetic_train_size": 500, "synthetic_eval_size": 50})
    train, evals = embedded_datasets(cfg)
    train2, evals2 = embedded_datasets(cfg)
    assert [e.to_json() for e in train] == [e.to_json() for e in train2]
    assert [e.to_json() for e in evals] == [e.to_json() for e in evals2]
    assert not {e.prompt for e in evals} & {e.prompt for e in train}
    assert len({e.prompt for e in evals}) == len(evals)
    assert {e.task for e in train} == {"copy", "reverse", "expand", "insert", "dedup"}


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_formats(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "copy : a", "response": "a", "task": "copy"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    ])
    examples, skipped = read_jsonl(path)
    assert skipped == 0 and len(examples) == 2
    assert examples[0].prompt == "copy : a" and examples[0].task == "copy"
    assert examples[1].messages is not None and examples[1].response == "yo"


@pytest.mark.parametrize("bad,fragment", [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ('{"prompt": "a"}', "expected string fields `prompt` and `response`"),
    ('{"prompt": 3, "response": "x"}', "expected string fields"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "at least 2 messages"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "role 'assistant'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}', "messages[0]"),
])
def test_malformed_line_is_reported_with_its_number(tmp_path, bad, fragment):
    good = json.dumps({"prompt": "p", "response": "r"})
    path = _write(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"{path}:3:" in str(err.value) and fragment in str(err.value) and "--skip-bad" in str(err.value)
    examples, skipped = read_jsonl(path, skip_bad=True)
    assert (len(examples), skipped) == (3, 1)


def test_all_lines_bad_is_an_error(tmp_path):
    path = _write(tmp_path / "d.jsonl", ["nope", "{}"])
    with pytest.raises(DataError, match="no usable examples \\(2 malformed lines skipped\\)"):
        read_jsonl(path, skip_bad=True)


def test_cli_malformed_data(tmp_path, capsys):
    good = json.dumps({"prompt": "copy : a b", "response": "a b"})
    path = _write(tmp_path / "d.jsonl", [good, "{oops", good])
    args = ["train", "--train-file", path, "--eval-file", path, "--output-dir", str(tmp_path / "runs"),
            "--steps", "1", "--tiny-hidden-size", "16", "--tiny-layers", "1", "--tiny-intermediate-size", "16",
            "--batch-size", "2", "--no-progress", "--checkpoint-every", "0"]
    assert main(args) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    assert "1 malformed lines skipped (train file, --skip-bad)" in capsys.readouterr().out


def test_tokenizer_is_deterministic_and_has_the_special_tokens(tmp_path):
    cfg = Config.from_dict({"synthetic_train_size": 300, "synthetic_eval_size": 10})
    train, _ = embedded_datasets(cfg)
    texts = list(tokenizer_corpus(train))
    a, b = train_tokenizer(texts, 4096), train_tokenizer(texts, 4096)
    assert a.get_vocab() == b.get_vocab()
    assert [a.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (a.mask_token_id, a.eos_token_id, a.pad_token_id) == (2, 1, 0)
    ids = a("expand : 1 0 *3 5 _")["input_ids"]
    assert a.decode(ids) == "expand : 1 0 *3 5 _" and a.unk_token_id not in ids
    cached = load_or_train_tokenizer(texts, 4096, str(tmp_path / "tok"))
    again = load_or_train_tokenizer(texts, 4096, str(tmp_path / "tok"))
    assert cached.get_vocab() == again.get_vocab() == a.get_vocab()
    assert cached.convert_tokens_to_ids("<slack>") == 3


def test_encode_drops_or_rejects_too_long_rows():
    tok = train_tokenizer(["copy : a b c d e f"], 100)
    examples = [Example(prompt="copy : a b", response="a b"), Example(prompt="copy : a b c d e f",
                                                                      response="a b c d e f")]
    rows, dropped = encode_examples(examples, tok, max_length=8)
    assert dropped == 1 and rows[0].prompt_ids == tok("copy : a b")["input_ids"] and len(rows[0].answer_ids) == 2
    with pytest.raises(ValueError, match="`max_length` is 8"):
        encode_examples(examples, tok, max_length=8, too_long="error")


def test_order_and_noise_seeds_are_split_independent():
    order = GlobalOrder(10, 4, seed=3)
    stream = sum((order.batch(s) for s in range(5)), [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert GlobalOrder(10, 4, seed=3).batch(3) == order.batch(3)  # restartable at any step
    assert GlobalOrder(10, 4, seed=4).batch(0) != order.batch(0)
    seeds = {noise_seed(0, s, j) for s in range(50) for j in range(32)}
    assert len(seeds) == 50 * 32 and all(0 <= x < 2**63 for x in seeds)
