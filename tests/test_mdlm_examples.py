"""The configuration files under examples/ say what the README says they do."""

import os

import pytest

yaml = pytest.importorskip("yaml")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_accelerate_config_is_fsdp2_on_8_gpus(monkeypatch):
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(EXAMPLES, "accelerate_fsdp2_8gpu.yaml"),
                                               "sft.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    for key, value in prepare_multi_gpu_env(args).items():  # what `accelerate launch` hands the 8 processes
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LLaDALlamaBlock"]
    assert plugin.activation_checkpointing and plugin.reshard_after_forward
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"


def test_nemo_recipe_names_the_strategy_and_valid_options():
    from mdlm_ctc.mdlm import nemo

    with open(os.path.join(EXAMPLES, "nemo_llada_slack_ctc.yaml")) as f:
        recipe = yaml.safe_load(f)
    dllm = recipe["dllm"]
    assert dllm["mode"] == nemo.STRATEGY_NAME and dllm["supervise_padding"] is True
    assert recipe["distributed"]["cp_size"] == 1
    spec = nemo.objective_from_dllm_config(dllm)
    assert (spec.objective, spec.ctc_canvas, spec.slack_budget, spec.normalization) == ("ctc", "eos", 2, "token")
