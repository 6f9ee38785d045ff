"""benchmark/recipes/tldr.sh: every command it would run (DRY_RUN=1) parses with its script's own Args, shards what
does not fit one GPU, chains each stage to the previous stage's folder, and divides the global batches evenly."""

import importlib
import os
import shlex
import subprocess
import sys

import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "benchmark", "recipes", "tldr.sh")
sys.path.insert(0, ROOT)


def dry_run(*cli):
    env = {**os.environ, "DRY_RUN": "1", "SEEDS": "44413 55513"}
    return subprocess.run(["bash", RECIPE, *cli], capture_output=True, text=True, env=env, timeout=60)


def commands(size, gpus):
    """(processes, script, Args) for every printed command line."""
    result = dry_run(size, gpus)
    assert result.returncode == 0, result.stderr
    parsed = []
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        if words[0] == "torchrun":
            assert words[1] == "--nproc-per-node"
            processes, words = int(words[2]), words[3:]
        else:
            assert words[0] == "python"
            processes, words = 1, words[1:]
        module = importlib.import_module(words[0][: -len(".py")])
        parsed.append((processes, words[0], tyro.cli(module.Args, args=words[1:])))  # unknown flags fail here
    return parsed


@pytest.mark.parametrize("size, gpus", [("1b", "8"), ("1b", "1"), ("2.8b", "8"), ("2.8b", "1"), ("6.9b", "8")])
def test_every_command_parses_and_fits(size, gpus):
    runs = commands(size, gpus)
    scripts = [script for _, script, _ in runs]
    per_seed = ["sft.py", "reward_model.py", "dpo.py"] + ([] if (size, gpus) == ("2.8b", "1") else ["ppo_tldr.py"])
    assert scripts == per_seed * 2  # two seeds
    for processes, script, args in runs:
        assert processes == int(gpus)
        assert args.seed in (44413, 55513) and args.output_dir == f"models/{size}/{script[:-3].replace('_tldr', '')}__{args.seed}"
        if script != "sft.py":
            assert args.sft_model_path == f"models/{size}/sft__{args.seed}"
        if script == "ppo_tldr.py":
            assert args.reward_model_path == f"models/{size}/reward_model__{args.seed}"
            assert args.total_episodes == 1_000_000
            per_process = args.batch_size // processes
            assert per_process % args.local_rollout_forward_batch_size == 0
        # sharded where DDP does not fit an 80 GB GPU (README.md "Multi-GPU and memory")
        assert args.fsdp == (size == "6.9b" or (script == "ppo_tldr.py" and size != "1b"))
        assert args.batch_size % (args.local_micro_batch_size * processes) == 0, (script, args.batch_size)


def test_unsupported_set_ups_are_refused_with_a_reason():
    result = dry_run("6.9b", "1")
    assert result.returncode == 2 and "6.9b needs --fsdp over several GPUs" in result.stderr and not result.stdout
    result = dry_run("3b", "8")
    assert result.returncode == 2 and "size must be 1b, 2.8b or 6.9b, got 3b" in result.stderr
    result = dry_run("1b")
    assert result.returncode != 0 and "usage: tldr.sh SIZE GPUS" in result.stderr
    assert "skipping PPO at 2.8b on 1 GPU" in dry_run("2.8b", "1").stderr
