"""The hub artefacts as a user loads them: a Hugging Face cache (in a temporary HF_HOME, HF_HUB_OFFLINE=1) holding
tiny models under the exact default ids, in the formats of the hub repos (README.md "value_head.py"), and `python ppo_tldr.py` with its default model arguments; the bias computed at PPO start against the one
reward_model.py stores.

The default dataset ids are not served this way: in offline mode `datasets.load_dataset("org/name")` raises before it
reads the hub cache (datasets--org--name) and falls back only to its own prepared-arrow cache, which only an online
load writes; the runs below pass a local --query-dataset."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForSequenceClassification

from conftest import run_ok, run_script, world_args
from test_value_head import reference_config

SFT_ID = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
REWARD_ID = "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"
RELEASE_ID = "vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr"
RELEASE_BRANCH = "reward__44413__1708628552"  # a run of the reference's release_runs.csv
RELEASE_BIAS = 0.375


def put_in_hub_cache(hf_home, repo_id, folder, revision="main"):
    """The files of `folder` as huggingface_hub caches repo `repo_id` at branch `revision`: content-addressed blobs,
    refs/{revision} naming a commit, snapshots/{commit}/{file} linking to the blobs."""
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(repo, "snapshots", commit, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit)


def pickled(model, folder):
    """config.json + pytorch_model.bin (torch.save of the state dict), the format of the hub's checkpoints."""
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "pytorch_model.bin"))


@pytest.fixture(scope="module")
def hub(world, tmp_path_factory):
    """HF_HOME with the SFT policy (tokenizer already holding [PAD]), the converted one-label classifier without score
    bias, config bias or pad token, and a reference-format reward model on a branch of the release repo (whose main
    holds only .gitattributes)."""
    home, staging = tmp_path_factory.mktemp("hf_home"), tmp_path_factory.mktemp("staging")
    base = str(world / "base_model")
    sft = staging / "sft"
    sft.mkdir()
    pickled(AutoModelForCausalLM.from_pretrained(base), sft)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(sft)
    put_in_hub_cache(home, SFT_ID, sft)

    reward = staging / "reward"
    reward.mkdir()
    torch.manual_seed(0)
    classifier = GPTNeoXForSequenceClassification.from_pretrained(base, num_labels=1, classifier_dropout=0.1)
    assert classifier.score.bias is None
    torch.nn.init.normal_(classifier.score.weight, std=0.1)
    pickled(classifier, reward)
    AutoTokenizer.from_pretrained(base).save_pretrained(reward)  # no pad token
    assert "bias" not in json.loads((reward / "config.json").read_text())
    put_in_hub_cache(home, REWARD_ID, reward)

    release, main = staging / "release", staging / "release_main"
    release.mkdir(), main.mkdir()
    (main / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    put_in_hub_cache(home, RELEASE_ID, main)
    config = reference_config(bias=RELEASE_BIAS)
    config["base_config"] = {**classifier.config.to_dict(), "_name_or_path": config["base_config"]["_name_or_path"]}
    config["hidden_size"] = classifier.config.hidden_size
    (release / "config.json").write_text(json.dumps(config, indent=2))
    state = {f"lm_backbone.{k}": v for k, v in classifier.gpt_neox.state_dict().items()}
    state.update({"scalar_head.weight": classifier.score.weight.detach(), "scalar_head.bias": torch.tensor([0.25])})
    torch.save({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, release / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(base).save_pretrained(release)
    put_in_hub_cache(home, RELEASE_ID, release, revision=RELEASE_BRANCH)
    return home


def run_ppo(hub, world, out, *extra):
    cli = ["--query-dataset", str(world / "tldr_sft"), "--query-length", "128", "--response-length", "8",
           "--total-episodes", "16", "--batch-size", "8", "--local-micro-batch-size", "4",
           "--local-rollout-forward-batch-size", "8", "--num-ppo-epochs", "1", "--num-eval-samples", "4",
           "--num-normalization-samples", "24", "--output-dir", str(out), *extra]
    return run_ok("ppo_tldr.py", *cli, env={"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def test_hub_tokenizers_as_shipped(hub, monkeypatch):
    from ppo_tldr import load_tokenizer

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "hub"))  # read at each call (HF_HOME only at import)
    shipped = AutoTokenizer.from_pretrained(SFT_ID)
    assert shipped.pad_token == "[PAD]"
    assert load_tokenizer(SFT_ID, "--sft-model-path").pad_token_id == shipped.pad_token_id
    assert AutoTokenizer.from_pretrained(REWARD_ID).pad_token is None


def test_sft_tokenizer_keeps_the_id_of_its_own_pad(world, tmp_path):
    import dpo
    import ppo_tldr
    import reward_model
    import sft

    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.add_tokens(["<after-pad>"])  # [PAD] is not the last id: adding it again would give a new one
    tokenizer.save_pretrained(tmp_path)
    pad_id = tokenizer.pad_token_id
    for script in (sft, reward_model, ppo_tldr, dpo):
        loaded = script.load_tokenizer(str(tmp_path), "--sft-model-path")
        assert loaded.pad_token_id == pad_id and len(loaded) == len(tokenizer)


@pytest.mark.slow
def test_the_literal_default_command_computes_logs_and_saves_the_bias(hub, world, tmp_path):
    from ppo_tldr import Args

    assert (Args.sft_model_path, Args.reward_model_path) == (SFT_ID, REWARD_ID)
    result = run_ppo(hub, world, tmp_path / "run")
    assert "normalisation bias" in result.stdout and "computed: mean score of 24 train reference summaries" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "normalization/bias" in metrics[0]
    assert [m["step"] for m in metrics if "ppo/episode" in m] == [1, 2]
    bias = metrics[0]["normalization/bias"]
    assert bias != 0.0 and f"rank 0: reward model normalisation bias {bias!r}" in result.stdout
    assert json.loads((tmp_path / "run" / "value_model" / "value_head.json").read_text())["bias"] == bias
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_released_reward_model_by_its_branch(hub, world, tmp_path):
    result = run_ppo(hub, world, tmp_path / "run", "--reward-model-path", RELEASE_ID,
                     "--reward-model-revision", RELEASE_BRANCH)
    assert f"normalisation bias {RELEASE_BIAS!r} (stored)" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("normalization/bias" not in m for m in metrics)  # a stored bias is used as it is
    assert json.loads((tmp_path / "run" / "value_model" / "value_head.json").read_text())["bias"] == RELEASE_BIAS


@pytest.mark.slow
def test_the_release_repo_main_branch_is_not_a_model(hub, world, tmp_path):
    result = run_script("ppo_tldr.py", "--reward-model-path", RELEASE_ID, "--query-dataset", str(world / "tldr_sft"),
                        "--output-dir", str(tmp_path / "run"), env={"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "--reward-model-path" in result.stderr and "revision main" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bias_at_ppo_start_equals_the_one_reward_model_py_stores(world, tmp_path):
    """reward_model.py trains and stores its bias; the same weights written in the reference's format without a bias
    make ppo_tldr.py compute it at start, from the same references: the two agree."""
    from test_reward_model import world_cli

    out = tmp_path / "rm"
    run_ok(*world_cli(world, out, "--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "16",
                      "--total-episodes", "32", "--local-eval-batch-size", "8", "--num-normalization-samples", "24",
                      "--no-run-eval"))
    stored = json.loads((out / "value_head.json").read_text())["bias"]
    unbiased = tmp_path / "unbiased"
    unbiased.mkdir()
    backbone = json.loads((out / "config.json").read_text())
    config = reference_config(bias=None)
    config["base_config"] = {**backbone, "_name_or_path": config["base_config"]["_name_or_path"]}
    config["hidden_size"] = backbone["hidden_size"]
    (unbiased / "config.json").write_text(json.dumps(config))
    state = {f"lm_backbone.{k}": v for k, v in load_file(str(out / "model.safetensors")).items()}
    state.update({f"scalar_head.{k}": v for k, v in load_file(str(out / "value_head.safetensors")).items()})
    torch.save(state, unbiased / "pytorch_model.bin")
    for name in os.listdir(out):
        if name.startswith(("tokenizer", "special_tokens")):
            (unbiased / name).write_bytes((out / name).read_bytes())
    def ppo(out, torchrun=False):
        result = run_ok("ppo_tldr.py", *world_args(world, "ppo_tldr.py", unbiased), "--query-length", "128",
                        "--response-length", "8", "--total-episodes", "8", "--batch-size", "8",
                        "--local-micro-batch-size", "4", "--local-rollout-forward-batch-size", "4",
                        "--num-ppo-epochs", "1", "--no-run-eval", "--num-normalization-samples", "24",
                        "--normalization-response-length", "64", "--output-dir", str(out), torchrun=torchrun)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["normalization/bias"], result.stdout

    computed, _ = ppo(tmp_path / "ppo")
    assert computed == pytest.approx(stored, abs=1e-6) and stored != 0.0
    # two processes: each scores half of the references; both get every score, hence the same bias
    two, stdout = ppo(tmp_path / "ppo2", torchrun=True)
    assert two == pytest.approx(computed, abs=1e-6)
    assert all(f"rank {r}: reward model normalisation bias {two!r}" in stdout for r in (0, 1))
