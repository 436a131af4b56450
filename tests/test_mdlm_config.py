"""The fine-tuning loop's configuration: defaults, files, flags, --help and clear errors."""

import json
from dataclasses import fields

import pytest

from mdlm_ctc.cli import _COMMANDS, build_parser, main
from mdlm_ctc.mdlm.config import SECTIONS, Config, config_from_args, load_config_file


def test_defaults_are_valid():
    cfg = Config().validate()
    assert cfg.model.model == "embedded"
    assert cfg.model.trust_remote_code is False  # remote code is never the default
    assert cfg.compare_objective_list() == ["ce", "ctc"]


@pytest.mark.parametrize("key,value,fragment", [
    ("lr", -1, "`lr` must be > 0; got -1"),
    ("schedule", "linear", "`schedule` must be one of 'cosine', 'wsd', 'constant'; got 'linear'"),
    ("objective", "mse", "`objective` must be one of"),
    ("block_length", 7, "`block_length` must be a divisor of gen_length"),
    ("sample_steps", 5, "`sample_steps` must be a positive multiple of the number of blocks"),
    ("shift_fractions", "0,abc", "`shift_fractions` must be comma-separated numbers"),
    ("ctc_weight", 1.5, "`ctc_weight` must be in [0, 1]; got 1.5"),
    ("slack_rate", 1.0, "`slack_rate` must be in [0, 1)"),
    ("steps", "ten", "`steps` must be an integer; got 'ten'"),
    ("train_file", "/nonexistent/data.jsonl", "`train_file` must be an existing file"),
    ("compare_objectives", "ce,ce", "`compare_objectives` must be distinct"),
    ("tiny_kv_heads", 3, "`tiny_kv_heads` must be a divisor of tiny_heads"),
    ("synthetic_tasks", "copy,sort", "`synthetic_tasks` must be a comma-separated subset"),
])
def test_bad_values_name_the_option(key, value, fragment):
    with pytest.raises(ValueError) as err:
        Config.from_dict({key: value})
    assert fragment in str(err.value)


def test_unknown_option_suggests_a_name():
    with pytest.raises(ValueError, match=r"unknown option `lrr` \(did you mean `lr`\?\)"):
        Config.from_dict({"lrr": 0.1})
    with pytest.raises(ValueError, match=r"unknown option `train.lrr`"):
        Config.from_dict({"train": {"lrr": 0.1}})


def test_yaml_and_json_files_nested_or_flat(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("train:\n  lr: 3.0e-4\n  steps: 7\nobjective: ce\nctc_max_shift: 2\n")
    cfg = Config.from_dict(load_config_file(str(y)))
    assert (cfg.train.lr, cfg.train.steps, cfg.objective.objective, cfg.objective.ctc_max_shift) == (3e-4, 7, "ce", 2)
    j = tmp_path / "job.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert Config.from_dict(load_config_file(str(j))) == cfg
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config_file(str(bad))


def test_flags_override_the_file(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("lr: 0.5\nsteps: 9\nprogress: false\n")
    args = build_parser().parse_args(["train", "--config", str(y), "--lr", "0.25", "--ctc-max-shift", "none"])
    cfg = config_from_args(args)
    assert (cfg.train.lr, cfg.train.steps, cfg.run.progress, cfg.objective.ctc_max_shift) == (0.25, 9, False, None)


def test_help_explains_every_option(capsys):
    for command, spec in _COMMANDS.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        exclude = spec.get("exclude", set())
        for sec in spec.get("sections", tuple(SECTIONS)):
            for f in fields(SECTIONS[sec]):
                if f.name not in exclude:
                    flag = "--" + f.name.replace("_", "-")
                    assert flag in text, f"{command} --help lacks {flag}"
                    assert f.metadata["help"], f"{f.name} has no help text"
        assert "(default:" in text


def test_cli_reports_bad_values_without_traceback(capsys):
    assert main(["train", "--lr", "-1"]) == 2
    assert "`lr` must be > 0; got -1.0" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "`checkpoint` is required" in capsys.readouterr().err
