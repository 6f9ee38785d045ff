"""Crash and resume, determinism, NaN/inf and bad input, with real subprocesses on the tiny offline world.

A run killed with SIGKILL (during training, or half-way through writing a checkpoint) and resumed with --resume must
end with the same weights, tables and metrics, byte for byte, as a run that was never interrupted. Timings (ppo/eps,
time/*) are the only metrics left out of the comparison. Every process uses one thread: bit-identical results on
CPU need the same thread count.
"""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import datasets
import pytest
import torch

from conftest import ONE_THREAD, raises_in_process, run_ok, run_script, world_args

pytestmark = pytest.mark.slow  # every test here runs the scripts as subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("ppo/eps", "time/")

# Runs a script with torch.save replaced by one that, for the checkpoint of the given step, writes half of the file,
# flushes it to disk and SIGKILLs its own process: a crash in the middle of a checkpoint write, at a known moment.
CRASH_IN_CHECKPOINT_WRITE = r"""
import io, os, runpy, signal, sys
import torch
real_save = torch.save
def save_half_then_die(obj, f, *args, **kwargs):
    if os.environ["CRASH_IN"] in getattr(f, "name", ""):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save_half_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ppo_command(world, reward_model, out, *extra):
    """5 updates of 16 episodes, a checkpoint every 2 updates (2, 4) and at the end (5); sample tables at 1, 3, 5."""
    return ["ppo_tldr.py", *world_args(world, "ppo_tldr.py", reward_model), "--query-length", "128",
            "--response-length", "16", "--total-episodes", "80", "--batch-size", "16", "--local-micro-batch-size", "8",
            "--local-rollout-forward-batch-size", "16", "--num-ppo-epochs", "2", "--lr", "1e-3",
            "--sample-table-every", "2", "--num-eval-samples", "8", "--checkpoint-every", "2", "--keep-checkpoints", "2",
            "--output-dir", str(out), *extra]


def sft_command(world, reward_model, out, *extra):
    """8 updates of 16 sequences, a checkpoint every 2 updates and at the end."""
    return ["sft.py", *world_args(world, "sft.py"), "--query-length", "128", "--batch-size", "16",
            "--local-micro-batch-size", "8", "--lr", "3e-3", "--total-episodes", "128", "--num-eval-samples", "8",
            "--checkpoint-every", "2", "--keep-checkpoints", "2",
            "--output-dir", str(out), *extra]


SCRIPTS = {  # name -> (command, progress line printed after the update the run is killed in, step of the 2nd checkpoint)
    "ppo": (ppo_command, "[ppo] 3/5", "step_00000004"),
    "sft": (sft_command, "[sft] 5/8", "step_00000004"),
}


def kill_after_line(command, prefix):
    """Start the run, SIGKILL it as soon as it prints a line starting with `prefix` (training is under way)."""
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env={**os.environ, **ONE_THREAD},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(prefix):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMINGS)} for row in rows]


def outputs(out):
    """Every file a finished run leaves, bytes included, except its checkpoints and metrics.jsonl (compared without
    timings)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "checkpoints" and p.name != "metrics.jsonl"}


def checkpoints(out):
    return sorted(os.listdir(out / "checkpoints"))


@pytest.fixture(scope="module")
def uninterrupted(world, reward_model, tmp_path_factory):
    """name -> output folder of an uninterrupted run of each script."""
    runs = {}
    for name, (command, _, _) in SCRIPTS.items():
        runs[name] = tmp_path_factory.mktemp(name) / "uninterrupted"
        run_ok(*command(world, reward_model, runs[name]))
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_killed_while_writing_a_checkpoint_then_during_training_then_resumed_is_bit_identical(name, world, reward_model,
                                                                                            uninterrupted, tmp_path):
    """Killed half-way through writing its second checkpoint; resumed (from the first) and killed again during
    training; resumed again: the outputs are those of the uninterrupted run."""
    command, line, crash_in = SCRIPTS[name]
    out = tmp_path / "run"
    result = run_script("-c", CRASH_IN_CHECKPOINT_WRITE, *command(world, reward_model, out),
                        env={"CRASH_IN": crash_in})
    assert result.returncode == -signal.SIGKILL
    assert checkpoints(out) == ["step_00000002", f"tmp_{crash_in}"]  # the half-written one was never renamed
    with pytest.raises(Exception):
        torch.load(out / "checkpoints" / f"tmp_{crash_in}" / "state.pt", weights_only=False)  # it is half a file
    kill_after_line(command(world, reward_model, out, "--resume"), line)  # resumes from step 2, not the half one
    assert len(metrics(out)) < len(metrics(uninterrupted[name]))
    result = run_ok(*command(world, reward_model, out, "--resume"))
    assert "resumed from update" in result.stdout
    assert metrics(out) == metrics(uninterrupted[name])
    assert outputs(out) == outputs(uninterrupted[name])  # weights, value model, eval and sample tables
    assert checkpoints(out) == checkpoints(uninterrupted[name])  # the newest --keep-checkpoints 2; tmp_ cleared


def test_a_different_seed_gives_different_samples(world, reward_model, uninterrupted, tmp_path):
    """(The same seed gives the same run: the crash test's fresh, killed and resumed runs end as the uninterrupted.)"""
    run_ok(*ppo_command(world, reward_model, tmp_path / "seed2", "--seed", "2"))
    samples = [[json.loads(line)["response"] for line in (out / "samples_update_5.jsonl").read_text().splitlines()]
               for out in (uninterrupted["ppo"], tmp_path / "seed2")]
    assert samples[0] != samples[1]
    assert metrics(tmp_path / "seed2") != metrics(uninterrupted["ppo"])


def test_resume_from_an_earlier_checkpoint_reproduces_the_run(world, reward_model, tmp_path):
    """PPO under torchrun (2 processes: per-process random states): roll a finished run back to its update-2
    checkpoint, delete its outputs, resume it; everything comes back the same. (The reward model's, DPO's and SFT's
    FSDP tests roll back and resume their runs in the same way.)"""
    command = ["ppo_tldr.py", *world_args(world, "ppo_tldr.py", reward_model), "--query-length", "128",
               "--response-length", "16", "--total-episodes", "64", "--batch-size", "16", "--local-micro-batch-size",
               "8", "--local-rollout-forward-batch-size", "8", "--num-ppo-epochs", "2", "--lr", "1e-3",
               "--num-eval-samples", "6", "--checkpoint-every", "1", "--keep-checkpoints", "4"]
    finished, rolled_back = tmp_path / "finished", tmp_path / "rolled_back"
    run_ok(*command, "--output-dir", str(finished), torchrun=True)
    assert checkpoints(finished) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    shutil.copytree(finished, rolled_back)
    for name in ["step_00000003", "step_00000004"]:
        shutil.rmtree(rolled_back / "checkpoints" / name)
    for name in outputs(rolled_back):  # left to resume from: the checkpoints, metrics.jsonl, update 1's samples
        if name != "samples_update_1.jsonl":
            os.remove(rolled_back / name)
    result = run_ok(*command, "--output-dir", str(rolled_back), "--resume", torchrun=True)
    assert "resumed from update 2" in result.stdout
    assert metrics(rolled_back) == metrics(finished)
    assert outputs(rolled_back) == outputs(finished)


def test_the_adaptive_kl_coefficient_follows_the_controller_and_a_resumed_run_continues_it(world, reward_model, tmp_path):
    """--kl-target: each update's logged coefficient is the controller applied to the previous update's coefficient and
    KL; a run resumed from its update-2 checkpoint continues with the checkpointed coefficient."""
    from ppo_tldr import adaptive_kl_coef

    extra = ["--kl-target", "0.5", "--kl-horizon", "100", "--kl-estimator", "k3", "--checkpoint-every", "1",
             "--keep-checkpoints", "5"]
    finished, rolled_back = tmp_path / "finished", tmp_path / "rolled_back"
    run_ok(*ppo_command(world, reward_model, finished, *extra))
    updates = [m for m in metrics(finished) if "objective/kl_coef" in m]
    assert len(updates) == 5 and updates[0]["objective/kl_coef"] == 0.05
    for previous, current in zip(updates, updates[1:]):
        expected = adaptive_kl_coef(previous["objective/kl_coef"], previous["objective/kl"], 0.5, 100, 16)
        assert current["objective/kl_coef"] == pytest.approx(expected, rel=1e-12)
    assert len({m["objective/kl_coef"] for m in updates}) == 5  # it moved at every update
    shutil.copytree(finished, rolled_back)
    for name in ["step_00000003", "step_00000004", "step_00000005"]:
        shutil.rmtree(rolled_back / "checkpoints" / name)
    result = run_ok(*ppo_command(world, reward_model, rolled_back, *extra, "--resume"))
    assert "resumed from update 2" in result.stdout
    assert metrics(rolled_back) == metrics(finished)


# ------------------------------------------------------------ NaN / inf ------------------------------------------
def test_a_nan_score_stops_ppo_naming_it_and_the_update(world, reward_model, tmp_path):
    from value_head import ScalarModel

    broken = tmp_path / "nan_reward_model"
    model = ScalarModel.from_pretrained(str(reward_model))
    with torch.no_grad():
        model.scalar_head.weight.fill_(float("nan"))
    model.save_pretrained(str(broken))
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(reward_model / name, broken / name)
    out = tmp_path / "run"
    result = run_script(*ppo_command(world, broken, out, "--missing-eos-score", "None"))  # every score is the model's
    assert result.returncode != 0
    assert "objective/scores is NaN or inf at update 1" in result.stderr
    saved = torch.load(out / "nonfinite" / "rank0.pt", weights_only=False)
    assert saved["quantity"] == "objective/scores" and saved["query_responses"].shape == (16, 128 + 16)
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_a_nan_loss_stops_sft_and_keeps_the_last_good_checkpoint(world, reward_model, tmp_path):
    out = tmp_path / "run"
    result = run_script(*sft_command(world, reward_model, out, "--lr", "1e30", "--checkpoint-every", "1"))
    assert result.returncode != 0
    assert "train/sft/loss is NaN or inf at update 2" in result.stderr
    assert checkpoints(out) == ["step_00000001"]
    assert (out / "nonfinite" / "rank0.pt").exists() and not (out / "model.safetensors").exists()


# ------------------------------------------------------------ bad input ------------------------------------------
def script_arguments(script, world, reward_model, out):
    common = ["--query-length", "128", "--batch-size", "16", "--local-micro-batch-size", "8", "--output-dir", str(out)]
    if script == "ppo_tldr.py":
        return [*world_args(world, script, reward_model), "--local-rollout-forward-batch-size", "16",
                "--total-episodes", "32", *common]
    return [*world_args(world, script), *common]


@pytest.fixture(scope="module")
def bad_inputs(world, reward_model, tmp_path_factory):
    """A model whose tokenizer has no EOS, a reward model with another tokenizer, datasets with an empty split."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(world / "base_model", root / "no_eos")
    config = json.loads((root / "no_eos" / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (root / "no_eos" / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(reward_model, root / "other_tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reward_model))
    tokenizer.add_tokens(["zyzzyva"])
    tokenizer.save_pretrained(str(root / "other_tokenizer"))
    from safetensors.torch import load_file, save_file
    from transformers import GPTNeoXForSequenceClassification

    for labels, name in [(2, "two_labels"), (1, "headless")]:  # reward models that must fail before any write
        GPTNeoXForSequenceClassification.from_pretrained(str(world / "base_model"), num_labels=labels).save_pretrained(
            str(root / name))
    weights = load_file(str(root / "headless" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "score.weight"}, str(root / "headless" / "model.safetensors"))
    shutil.copytree(reward_model, root / "wrong_shape")
    head = load_file(str(root / "wrong_shape" / "value_head.safetensors"))
    save_file({"weight": head["weight"][:, :-1].contiguous(), "bias": head["bias"]},
              str(root / "wrong_shape" / "value_head.safetensors"))
    for name, split in [("tldr_sft", "validation"), ("tldr_preference", "train")]:
        for s in datasets.load_dataset(str(world / name)):
            rows = datasets.load_dataset(str(world / name), split=s)
            rows = rows.select([]) if s == split else rows
            rows.to_parquet(str(root / f"{name}_empty" / "data" / f"{s}-00000-of-00001.parquet"))
    return root


BAD_INPUTS = [  # (scripts, extra arguments, what the message must say)
    ("sft.py ppo_tldr.py reward_model.py dpo.py", ["{model_arg}", "{bad}/no_eos"], "its tokenizer has no EOS token"),
    ("sft.py ppo_tldr.py reward_model.py dpo.py", ["{model_arg}", "/no/such/model"], "is not a folder"),
    ("sft.py ppo_tldr.py reward_model.py dpo.py", ["--response-length", "0"], "--response-length must be positive"),
    ("sft.py ppo_tldr.py reward_model.py dpo.py", ["--batch-size", "12"], "not divisible"),
    ("sft.py ppo_tldr.py reward_model.py dpo.py", ["--query-length", "4"], "--query-length 4 is too short"),
    ("sft.py ppo_tldr.py", ["--query-dataset", "{bad}/tldr_sft_empty"], "split is empty"),
    ("reward_model.py dpo.py", ["--label-dataset", "{bad}/tldr_preference_empty"], "split is empty"),
    ("ppo_tldr.py", ["--reward-model-path", "{bad}/other_tokenizer"], "its tokenizer differs from --sft-model-path's"),
    ("ppo_tldr.py", ["--reward-model-path", "{bad}/two_labels"], "num_labels=2; a reward model has 1"),
    ("ppo_tldr.py", ["--reward-model-path", "{bad}/headless"], "the weights do not match its config: missing (1): "
     "score.weight"),
    ("ppo_tldr.py", ["--reward-model-path", "{bad}/wrong_shape"], "wrong shape (1): scalar_head.weight (1, 63), "
     "expected (1, 64)"),
    ("sft.py ppo_tldr.py reward_model.py dpo.py", ["--resume"], "holds no complete checkpoint"),
]


@pytest.mark.parametrize("script, extra, message", [(s, e, m) for scripts, e, m in BAD_INPUTS for s in scripts.split()])
def test_bad_input_fails_fast_and_leaves_a_good_output_alone(script, extra, message, world, reward_model, bad_inputs,
                                                             tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "good": true}\n')  # the output of an earlier, good run
    model_arg = "--base-model" if script == "sft.py" else "--sft-model-path"
    extra = [e.format(model_arg=model_arg, bad=bad_inputs) for e in extra]
    argv = [script, *script_arguments(script, world, reward_model, out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    assert os.listdir(out) == ["metrics.jsonl"] and "good" in (out / "metrics.jsonl").read_text()


def test_bad_input_exits_non_zero_with_the_message(world, reward_model, bad_inputs, tmp_path):
    result = run_script("ppo_tldr.py", *script_arguments("ppo_tldr.py", world, reward_model, tmp_path / "run"),
                        "--sft-model-path", str(bad_inputs / "no_eos"))
    assert result.returncode != 0 and "--sft-model-path" in result.stderr and "has no EOS token" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_refuses_to_overwrite_checkpoints_and_resume_refuses_other_arguments(world, reward_model,
                                                                                         uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted["sft"], out)
    before = outputs(out)
    raises_in_process(*sft_command(world, reward_model, out), match="pass --resume to continue it")
    raises_in_process(*sft_command(world, reward_model, out, "--resume", "--lr", "1e-3"), match="--lr 0.003 -> 0.001")
    assert outputs(out) == before
