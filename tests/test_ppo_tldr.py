import json
import math
import os
import runpy
import sys

import pytest
import torch

from conftest import audited_run, free_port, raises_in_process, read_jsonl, run_ok, world_args
from ppo_tldr import (
    INVALID_LOGPROB, adaptive_kl_coef, compute_advantages, compute_rewards, first_true_indices, masked_mean,
    masked_whiten, per_token_kl, truncate_response, validation_indices,
)

EOS, PAD = 0, 9


# ---------------------------------------------------------------- pure functions, by hand ----------------------
def test_first_true_indices():
    bools = torch.tensor([[False, True, False], [False, False, False], [True, True, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_truncate_response_eos_in_the_middle_at_the_end_and_none():
    responses = torch.tensor([[5, EOS, 6, EOS], [5, 6, 7, EOS], [5, 6, 7, 8]])
    assert truncate_response(EOS, PAD, responses).tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, EOS], [5, 6, 7, 8]]


def biased_var(values, mask):
    """The biased variance of values[mask], computed directly."""
    return values[mask].var(unbiased=False).item()


def test_masked_statistics_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.5)
    assert masked_mean(values, mask, axis=1).tolist() == pytest.approx([1.5, 3.5])
    # values 1, 2, 3, 4: mean 2.5, biased variance 1.25
    whitened = masked_whiten(values, mask)
    expected = [(v - 2.5) / (1.25 + 1e-8) ** 0.5 for v in (1.0, 2.0, 3.0, 4.0)]
    assert whitened[mask].tolist() == pytest.approx(expected, rel=1e-5)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert biased_var(whitened, mask) == pytest.approx(1.0, rel=1e-5)
    assert masked_whiten(values, mask, shift_mean=False)[mask].tolist() == pytest.approx([e + 2.5 for e in expected], rel=1e-5)


def test_compute_rewards_places_the_score_after_the_eos():
    # row 0: EOS at index 1 (score at 2); row 1: EOS last (score at 3); row 2: no EOS (score at 3)
    logprobs = torch.tensor([[-1.0, -2.0, INVALID_LOGPROB, INVALID_LOGPROB], [-1.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, INVALID_LOGPROB, INVALID_LOGPROB], [-1.0, -2.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -1.5]])
    sequence_lengths = torch.tensor([1, 3, 3])
    scores = torch.tensor([10.0, 20.0, -1.0])
    rewards, non_score_reward, kl = compute_rewards(scores, logprobs, ref_logprobs, sequence_lengths, kl_coef=0.1)
    torch.testing.assert_close(kl, logprobs - ref_logprobs)  # k1, the default
    expected_kl_penalty = [[-0.05, 0.1, 0.0, 0.0], [0.0, -0.1, 0.0, 0.0], [0.0, 0.0, 0.0, -0.1]]
    torch.testing.assert_close(non_score_reward, torch.tensor(expected_kl_penalty))
    expected = [[-0.05, 0.1, 10.0, 0.0], [0.0, -0.1, 0.0, 20.0], [0.0, 0.0, 0.0, -1.1]]
    torch.testing.assert_close(rewards, torch.tensor(expected))
    at_eos, _, _ = compute_rewards(scores, logprobs, ref_logprobs, sequence_lengths, kl_coef=0.1, score_at_eos=True)
    torch.testing.assert_close(at_eos, torch.tensor([[-0.05, 10.1, 0.0, 0.0], [0.0, -0.1, 0.0, 20.0], [0.0, 0.0, 0.0, -1.1]]))


def test_k3_kl_by_hand_is_zero_after_the_eos():
    # row 0 ends at its EOS (index 1): the last two positions hold INVALID_LOGPROB in both and contribute 0
    logprobs = torch.tensor([[-1.0, -2.0, INVALID_LOGPROB, INVALID_LOGPROB], [-1.0, -1.0, -0.5, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, INVALID_LOGPROB, INVALID_LOGPROB], [-1.0, -2.0, -0.5, -1.0]])
    # k3 = r - 1 - log r with log r = ref - logprob: log r = -0.5 -> e^-0.5 - 0.5 = 0.1065307; log r = 1 -> e - 2 =
    # 0.7182818; log r = 0 -> 0; log r = -1 -> e^-1 = 0.3678794; log r = 2 -> e^2 - 3 = 4.3890561
    expected = [[0.1065307, 0.7182818, 0.0, 0.0], [0.0, 0.3678794, 0.0, 4.3890561]]
    torch.testing.assert_close(per_token_kl(logprobs, ref_logprobs, "k3"), torch.tensor(expected))
    assert (per_token_kl(logprobs, ref_logprobs, "k3") >= 0).all()
    rewards, non_score_reward, kl = compute_rewards(torch.tensor([2.0, 3.0]), logprobs, ref_logprobs,
                                                    torch.tensor([1, 3]), kl_coef=0.1, kl_estimator="k3")
    torch.testing.assert_close(kl, torch.tensor(expected))
    torch.testing.assert_close(non_score_reward, -0.1 * torch.tensor(expected))
    expected_rewards = [[-0.01065307, -0.07182818, 2.0, 0.0], [0.0, -0.03678794, 0.0, -0.43890561 + 3.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected_rewards))
    with pytest.raises(ValueError, match="--kl-estimator"):
        per_token_kl(logprobs, ref_logprobs, "k2")


def test_adaptive_kl_controller_by_hand():
    # target 6 nats, horizon 10,000 episodes, 512 episodes per update: multiplier 1 + clip(KL / 6 - 1, +-0.2) * 0.0512
    coef = 0.05
    coef = adaptive_kl_coef(coef, 6.6, target=6.0, horizon=10000, batch_size=512)  # above: error +0.1 -> x 1.00512
    assert coef == pytest.approx(0.050256)
    coef = adaptive_kl_coef(coef, 5.4, target=6.0, horizon=10000, batch_size=512)  # below: error -0.1 -> x 0.99488
    assert coef == pytest.approx(0.050256 * 0.99488)  # 0.04999869...
    coef = adaptive_kl_coef(coef, 60.0, target=6.0, horizon=10000, batch_size=512)  # far above: error 9 clipped to 0.2
    assert coef == pytest.approx(0.050256 * 0.99488 * 1.01024)
    assert adaptive_kl_coef(0.05, 0.0, 6.0, 10000, 512) == pytest.approx(0.05 * 0.98976)  # far below: -1 clipped to -0.2
    assert adaptive_kl_coef(0.05, 6.0, 6.0, 10000, 512) == 0.05  # on target: unchanged


def test_gae_on_three_steps_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    # gamma 1, lambda 0.95: delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.7 - 0.6 = 0.1; delta_0 = 0.6 - 0.5 = 0.1
    a2 = 0.3
    a1 = 0.1 + 0.95 * a2  # 0.385
    a0 = 0.1 + 0.95 * a1  # 0.46575
    advantages, returns = compute_advantages(rewards, values, torch.zeros(1, 3, dtype=torch.bool), gamma=1.0, lam=0.95)
    assert returns.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])
    mean = (a0 + a1 + a2) / 3
    std = (((a0 - mean) ** 2 + (a1 - mean) ** 2 + (a2 - mean) ** 2) / 3 + 1e-8) ** 0.5  # biased variance, eps 1e-8
    assert advantages.tolist()[0] == pytest.approx([(a - mean) / std for a in (a0, a1, a2)], rel=1e-4)
    # gamma 0.5, lambda 0: one-step TD errors
    advantages_td, returns_td = compute_advantages(rewards, values, torch.zeros(1, 3, dtype=torch.bool), 0.5, 0.0)
    assert (returns_td - values).tolist()[0] == pytest.approx([0.3 - 0.5, 0.35 - 0.6, 0.3])


def test_gae_whitens_over_valid_tokens_and_zeroes_padding():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    values = torch.zeros(2, 3)
    padding_mask = torch.tensor([[False, False, True], [False, False, False]])
    advantages, _ = compute_advantages(rewards, values, padding_mask, 1.0, 1.0)
    assert advantages[0, 2].item() == 0.0
    valid = ~padding_mask
    assert masked_mean(advantages, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert biased_var(advantages, valid) == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------- the real command line ------------------------
def ppo_args(world, reward_model, output_dir, *extra):
    return [*world_args(world, "ppo_tldr.py", reward_model), "--query-length", "128", "--response-length", "24",
            "--batch-size", "16", "--local-micro-batch-size", "8", "--local-rollout-forward-batch-size", "16",
            "--lr", "1e-4", "--output-dir", str(output_dir), *extra]


def read_metrics(output_dir):
    return read_jsonl(output_dir / "metrics.jsonl")


def test_logits_kept_at_the_response_positions_only_equal_the_full_forwards(world):
    """forward(..., logits_to_keep=R + 1).logits[:, :-1] is the slice [Q - 1 : -1] of the full logits: the same
    positions (those that predict the R response tokens), left-padded queries and right-padded responses included."""
    from ppo_tldr import forward

    policy, _ = _policy_and_value(str(world / "base_model"))
    query_responses = torch.randint(1, 700, (3, 6 + 5), generator=torch.Generator().manual_seed(1))
    query_responses[0, :2] = 10_000  # a left-padded query
    query_responses[1, -2:] = 10_000  # a response that ended early
    with torch.no_grad():
        full = forward(policy, query_responses, 10_000).logits
        kept = forward(policy, query_responses, 10_000, logits_to_keep=5 + 1).logits
    assert kept.shape == (3, 6, full.shape[-1])
    torch.testing.assert_close(kept[:, :-1], full[:, 6 - 1 : -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kept[:, :-1], full[:, 6 - 2 : -2])  # a slice one position off differs


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--group-by-length", "--local-rollout-forward-batch-size", "4"]])
def test_first_minibatch_ratio_is_one_and_optimizer_steps(world, reward_model, tmp_path, extra):
    """One epoch, one mini-batch: every micro-batch precedes the only optimizer step, so the logged ratio is 1 and
    approx-KL 0 (old logprobs, temperature scaling and masking agree, also between rollout chunks and micro-batches
    that drop different amounts of padding, and with the chunks grouped by length: the episodes are put back in order);
    one optimizer step per update."""
    out = tmp_path / "run"
    run_ok("ppo_tldr.py", *ppo_args(world, reward_model, out, "--total-episodes", "32", "--num-ppo-epochs", "1",
                                    "--num-mini-batches", "1", "--no-run-eval", *extra))
    metrics = [m for m in read_metrics(out) if "ppo/val/ratio" in m]
    for m in metrics:
        assert m["ppo/val/ratio"] == pytest.approx(1.0, abs=1e-5)
        assert m["ppo/policy/approxkl_avg"] < 1e-9
        assert m["ppo/policy/clipfrac_avg"] == 0.0
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is the reference at first
    assert [m["ppo/optimizer_steps"] for m in metrics] == [1, 2]


@pytest.mark.slow
def test_smoke_run_saves_a_loadable_policy_and_counts_optimizer_steps(world, reward_model, tmp_path):
    """Also run with every FutureWarning and DeprecationWarning shown: none points at one of our files."""
    from transformers import AutoModelForCausalLM

    from value_head import ScalarModel

    out = tmp_path / "run"
    result = run_ok("ppo_tldr.py", *ppo_args(world, reward_model, out, "--total-episodes", "48", "--num-ppo-epochs", "2",
                                             "--num-mini-batches", "2", "--local-micro-batch-size", "4",
                                             "--num-eval-samples", "8"),
                    env={"PYTHONWARNINGS": "always::FutureWarning,always::DeprecationWarning"})
    flagged = [line for line in (result.stdout + result.stderr).splitlines() if ("FutureWarning" in line or
               "DeprecationWarning" in line) and any(f + ":" in line for f in ("ppo_tldr.py", "value_head.py"))]
    assert not flagged, "\n".join(flagged)
    assert "past_key_values" not in result.stderr  # transformers' own warning names no file of ours
    metrics = read_metrics(out)
    updates = [m for m in metrics if "ppo/episode" in m]
    assert [m["ppo/episode"] for m in updates] == [16, 32, 48]
    assert [m["ppo/optimizer_steps"] for m in updates] == [4, 8, 12]  # epochs x mini-batches, whatever the micro size
    assert updates[-1]["ppo/lr"] == pytest.approx(1e-4 / 3)  # linear decay, set at the start of each update
    for key in ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "objective/validation_score", "ppo/policy/entropy_avg", "ppo/loss/value_avg",
                "ppo/val/clipfrac_avg", "ppo/val/ratio_var", "ppo/val/num_eos_tokens", "ppo/eps"]:
        assert key in updates[0]
    rows = [json.loads(line) for line in (out / "eval_validation.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"id", "query", "response", "reference", "score", "reference_score", "has_eos"} <= set(rows[0])
    AutoModelForCausalLM.from_pretrained(str(out))
    ScalarModel.from_pretrained(str(out / "value_model"))


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "12"], "--local-micro-batch-size"),
    (["--response-length", "0"], "--response-length must be positive"),
    (["--total-episodes", "8"], "smaller than one --batch-size"),
    (["--sft-model-path", "/no/such/model"], "--sft-model-path"),
    (["--fsdp"], "--fsdp shards the models over processes: launch with torchrun"),
    (["--kl-target", "0"], "--kl-target must be positive"),
    (["--kl-target", "-1.5"], "--kl-target must be positive"),
    (["--kl-horizon", "0"], "--kl-horizon must be positive"),
    (["--local-eval-batch-size", "100000"], "--local-eval-batch-size 100000 x 1 process"),
    (["--sample-table-every", "-1"], "--sample-table-every must be >= 0"),
    (["--num-eval-samples", "0"], "--num-eval-samples must be positive"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be positive"),
])
def test_bad_arguments_fail_before_loading_models(world, reward_model, tmp_path, monkeypatch, extra, message):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["ppo_tldr.py", *ppo_args(world, reward_model, out, "--total-episodes", "32"), *extra])
    with pytest.raises(ValueError, match=message):
        runpy.run_path("ppo_tldr.py", run_name="__main__")
    assert not out.exists()


def test_an_unknown_kl_estimator_is_refused_by_the_command_line(world, reward_model, tmp_path, capsys):
    out = tmp_path / "run"
    raises_in_process("ppo_tldr.py", *ppo_args(world, reward_model, out, "--total-episodes", "32"), "--kl-estimator",
                      "k2", error=SystemExit)
    stderr = capsys.readouterr().err
    assert "--kl-estimator" in stderr and "k2" in stderr
    assert not out.exists()


def test_a_dataset_without_the_needed_columns_is_named(world, reward_model, tmp_path, monkeypatch):
    import datasets

    broken = tmp_path / "broken"
    for split in ["train", "validation", "test"]:
        rows = datasets.load_dataset(str(world / "tldr_sft"), split=split).remove_columns(["title"])
        rows.to_parquet(str(broken / "data" / f"{split}-00000-of-00001.parquet"))
    monkeypatch.setattr(sys, "argv", ["ppo_tldr.py", *ppo_args(world, reward_model, tmp_path / "run", "--total-episodes", "32"),
                                      "--query-dataset", str(broken)])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['title'\]"):
        runpy.run_path("ppo_tldr.py", run_name="__main__")


@pytest.mark.slow
def test_torchrun_two_processes(world, reward_model, tmp_path):
    """Two CPU processes (gloo): the global batch is split, statistics are gathered, evaluation rows are gathered,
    and the optimizer takes the same number of steps per update as one process would. The per-update validation
    sample: 2 distinct prompts per process, gathered into the tables of updates 1 and 2 (the last); each sampled
    before the rollout, by the policy that the rollout then samples from (update 1: the SFT policy; update 2: the
    policy of the update-1 checkpoint); `objective/validation_score` is the mean of its table's 4 scores."""
    import datasets

    from ppo_tldr import generate, left_padded_queries, load_policy, load_tokenizer, set_rng_states
    from value_head import ScalarModel, get_reward

    out = tmp_path / "run"
    run_ok("ppo_tldr.py", *ppo_args(world, reward_model, out, "--total-episodes", "32", "--num-ppo-epochs", "2",
                                    "--local-rollout-forward-batch-size", "8", "--num-eval-samples", "6",
                                    "--checkpoint-every", "1", "--keep-checkpoints", "2"), torchrun=True)
    updates = [m for m in read_metrics(out) if "ppo/episode" in m]
    assert [m["ppo/episode"] for m in updates] == [16, 32]
    assert [m["ppo/optimizer_steps"] for m in updates] == [2, 4]
    validation = datasets.load_dataset(str(world / "tldr_sft"), split="validation")
    rows = [json.loads(line) for line in (out / "eval_validation.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == validation["id"][:6]  # both processes' shares, gathered in dataset order
    tables = {u: [json.loads(line) for line in (out / f"samples_update_{u}.jsonl").read_text().splitlines()] for u in (1, 2)}
    for update, table in tables.items():
        assert [r["id"] for r in table] == validation["id"][:4]  # rank 0: rows 0, 1; rank 1: rows 2, 3
        assert [r["episode"] for r in table] == [16 * (update - 1)] * 4  # episodes the sampled policy trained on
        assert updates[update - 1]["objective/validation_score"] == pytest.approx(sum(r["score"] for r in table) / 4,
                                                                                   rel=1e-5, abs=1e-6)
    assert [r["response"] for r in tables[1]] != [r["response"] for r in tables[2]]

    # update 2's sample, redone from the update-1 checkpoint (the policy and every process's random state at the start
    # of update 2): the same responses and scores, so it came first in update 2, from the policy its rollout used
    tokenizer = load_tokenizer(str(world / "base_model"), "--sft-model-path")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    checkpoint = torch.load(out / "checkpoints" / "step_00000001" / "state.pt", weights_only=False)
    trained = load_policy(str(world / "base_model"), tokenizer, torch.device("cpu")).eval()
    trained.load_state_dict({k[len("policy."):]: v for k, v in checkpoint["model"].items() if k.startswith("policy.")})
    sft = load_policy(str(world / "base_model"), tokenizer, torch.device("cpu")).eval()
    scorer = ScalarModel.from_pretrained(str(reward_model)).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the run's thread count: the same floats
    try:
        for rank in (0, 1):
            queries = left_padded_queries(tokenizer, [validation[i] for i in (2 * rank, 2 * rank + 1)], 128)
            for policy, same in [(trained, True), (sft, False)]:
                set_rng_states(checkpoint["rng"], rank)
                with torch.no_grad():
                    query_responses, _ = generate(policy, queries, pad, 24, 0.01)
                    responses = truncate_response(eos, pad, query_responses[:, 128:])
                    scores = get_reward(scorer, torch.cat([queries, responses], 1), pad, 128)[1]
                scores = torch.where((responses == eos).any(-1), scores, -1.0)  # --missing-eos-score
                rows = tables[2][2 * rank : 2 * rank + 2]
                texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
                assert (texts == [r["response"] for r in rows]) == same, (rank, same)
                if same:
                    assert scores.tolist() == pytest.approx([r["score"] for r in rows], rel=1e-5, abs=1e-6)
    finally:
        torch.set_num_threads(threads)


def _whiten_in_a_process_group(rank, world_size, port, values, mask, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    share = slice(rank * 2, (rank + 1) * 2)
    results[rank] = masked_whiten(values[share], mask[share], world_size=world_size)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_advantage_whitening_uses_the_statistics_of_every_process():
    """Two gloo processes holding 2 rows each whiten exactly as one process holding all 4 rows; per-process
    whitening (the reference's) would not."""
    import torch.multiprocessing as mp

    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [10.0, 20.0, 30.0], [0.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_whiten_in_a_process_group, args=(2, port, values, mask, results), nprocs=2)
    together = torch.cat([results[0], results[1]])
    expected = masked_whiten(values, mask)
    assert torch.allclose(together[mask], expected[mask], atol=1e-6)
    assert not torch.allclose(masked_whiten(values[:2], mask[:2])[mask[:2]], expected[:2][mask[:2]], atol=1e-3)


@pytest.mark.slow
def test_fsdp_shards_and_matches_ddp_and_resumes(world, reward_model, tmp_path):
    """--fsdp on two gloo processes: each holds about half of the trained parameters; the run (rollouts, updates with
    the all-reduced advantage whitening, evaluation with uneven shares of 7 posts, saved policy and value model)
    matches the DDP run with the same seeds; rolled back to its update-1 checkpoint and resumed, it ends the same.
    Every run's collectives are audited: every tensor entering one is on the compute device, as NCCL requires; and
    sampling all-gathers each of the policy's sharded modules (2 blocks + the root) once per generate call, not once
    per token: at least 10x fewer all-gathers than one per block and token (a forward per token through a resharding
    block)."""
    import re
    import shutil

    from safetensors.torch import load_file

    response_length, updates, local_batch, chunk = 16, 2, 8, 8
    common = ["--total-episodes", str(2 * local_batch * updates), "--num-ppo-epochs", "2", "--local-micro-batch-size",
              "4", "--response-length", str(response_length), "--local-rollout-forward-batch-size", str(chunk),
              "--num-eval-samples", "7", "--checkpoint-every", "1", "--keep-checkpoints", "2",
              "--global-advantage-whitening"]
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    audited_run("ppo_tldr.py", *ppo_args(world, reward_model, ddp, *common), audit_dir=tmp_path / "audit_ddp")
    records, result = audited_run("ppo_tldr.py", *ppo_args(world, reward_model, fsdp, *common, "--fsdp"),
                                  audit_dir=tmp_path / "audit_fsdp")
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP holds (\d+) of the (\d+)", result.stdout)]
    assert len(held) == 2 and sum(h for h, _ in held) == held[0][1] and all(h < total for h, total in held)
    blocks, sharded_modules = 2, 3  # the tiny world's GPT-NeoX: 2 layers, then the whole model
    generate_calls = updates * (local_batch // chunk + 1) + 2  # rollout chunks + validation sample; 2 eval splits
    for r in records:
        sampling = r["all_gathers"].get("generate", 0)
        assert sampling == generate_calls * sharded_modules, r["all_gathers"]
        assert 10 * sampling <= generate_calls * response_length * blocks

    def comparable(out):
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "ppo/eps"))} for m in read_metrics(out)]

    def weights(out):
        return {f: load_file(str(out / f)) for f in ["model.safetensors", "value_model/model.safetensors",
                                                      "value_model/value_head.safetensors"]}

    assert len(comparable(fsdp)) == len(comparable(ddp)) == 4  # 2 updates, then validation and test evaluation
    for m_fsdp, m_ddp in zip(comparable(fsdp), comparable(ddp)):
        assert m_fsdp == pytest.approx(m_ddp, rel=1e-5, abs=1e-6)
    for f, tensors in weights(fsdp).items():
        assert max((tensors[k] - weights(ddp)[f][k]).abs().max().item() for k in tensors) < 1e-5, f
    rows = [json.loads(line)["id"] for line in (fsdp / "eval_validation.jsonl").read_text().splitlines()]
    assert len(rows) == len(set(rows)) == 7

    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    (resumed / "model.safetensors").unlink()
    audited_run("ppo_tldr.py", *ppo_args(world, reward_model, resumed, *common, "--fsdp", "--resume"),
                audit_dir=tmp_path / "audit_resumed")
    assert comparable(resumed) == comparable(fsdp)
    assert (resumed / "model.safetensors").read_bytes() == (fsdp / "model.safetensors").read_bytes()


def _policy_and_value(model_path):
    """The tiny base model as policy and as value backbone, the value head seeded: the same on every process."""
    from ppo_tldr import PolicyAndValueWrapper, config_without_dropout
    from transformers import AutoModelForCausalLM

    from value_head import ScalarModel

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_path, config=config_without_dropout(model_path))
    return policy, ScalarModel.from_backbone(model_path, config=config_without_dropout(model_path))


UPDATE_ARGS = dict(num_ppo_epochs=1, num_mini_batches=1, temperature=0.7, cliprange=0.2, cliprange_value=0.2,
                   vf_coef=0.1)


def _update(model, wrapper, rollout, micro_batch_size, accumulation, pad_token_id=10_000):
    """One ppo_update with plain SGD (AdamW's first step is lr * sign(gradient): it would amplify float noise)."""
    import contextlib
    from types import SimpleNamespace

    from ppo_tldr import ppo_update

    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    args = SimpleNamespace(**UPDATE_ARGS, local_micro_batch_size=micro_batch_size)
    stats, steps = ppo_update(model, optimizer, rollout, args, pad_token_id, accumulation, contextlib.nullcontext())
    assert steps == 1
    return stats


class FixedOutputs(torch.nn.Module):
    """Stands in for PolicyAndValueWrapper: the same logits (1, T, V) and values (1, T) whatever the input."""

    def __init__(self, logits, values):
        super().__init__()
        self.logits, self.values = torch.nn.Parameter(logits), torch.nn.Parameter(values)

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits[:, -logits_to_keep:]), self.values


def test_clipped_policy_and_value_losses_by_hand():
    """[PPO.policy_loss] [PPO.value_loss] on one episode of 3 response tokens, the third after the EOS (masked). Uniform
    logits over 3 tokens: every new log-prob is log(1/3). Token 0: old log-prob log(1/3) - log(1.5), so ratio 1.5,
    advantage 1: -1.5 clipped to -1.2. Token 1: ratio 1, advantage -2: 2. pg_loss = (-1.2 + 2) / 2 = 0.4. Values:
    vpred 0.5 (old 0, clipped to 0.2, return 1: max(0.25, 0.64) = 0.64) and 1.0 (old 1.1, return 0: 1 either way);
    vf_loss = 0.5 * (0.64 + 1) / 2 = 0.41. The masked token's huge advantage and return count for nothing."""
    model = FixedOutputs(torch.zeros(1, 1 + 3, 3), torch.tensor([[0.5, 1.0, 7.0, 9.0]]))
    third = math.log(1 / 3)
    rollout = dict(query_responses=torch.tensor([[5, 0, 1, 2]]), responses=torch.tensor([[0, 1, 2]]),
                   logprobs=torch.tensor([[third - math.log(1.5), third, INVALID_LOGPROB]]),
                   values=torch.tensor([[0.0, 1.1, 0.0]]), returns=torch.tensor([[1.0, 0.0, 100.0]]),
                   advantages=torch.tensor([[1.0, -2.0, 100.0]]), padding_mask=torch.tensor([[False, False, True]]),
                   padding_mask_p1=torch.tensor([[False, False, True]]))
    stats = {k: v.item() for k, v in _update(model, model, rollout, 1, 1).items()}
    assert stats["pg_loss"] == pytest.approx(0.4, rel=1e-5)
    assert stats["pg_clipfrac"] == 0.5
    assert stats["vf_loss"] == pytest.approx(0.41, rel=1e-5)
    assert stats["vf_clipfrac"] == 0.5
    assert stats["ratio"] == pytest.approx(1.25, rel=1e-5)
    assert stats["approxkl"] == pytest.approx(0.5 * math.log(1.5) ** 2 / 2, rel=1e-5)
    assert stats["entropy"] == pytest.approx(math.log(3), rel=1e-5)


def _update_in_a_process_group(rank, world_size, port, mode, model_path, rollout, results):
    import gc
    import os

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ppo_tldr import PolicyAndValueWrapper, gather_mean, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    policy, value_model = _policy_and_value(model_path)
    if mode == "fsdp":
        shard_model(policy, False), shard_model(value_model, False)
    wrapper = PolicyAndValueWrapper(policy, value_model)
    model = DDP(wrapper) if mode == "ddp" else wrapper
    share = {k: v[rank * 8 : (rank + 1) * 8] for k, v in rollout.items()}  # this process's 8 of the 16 episodes
    stats = _update(model, wrapper, share, 4, 2)  # 2 micro-batches of 4: the sync on the last one only
    state = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    losses = [gather_mean(stats[k].mean(), world_size).item() for k in ("pg_loss", "vf_loss")]
    if rank == 0:
        results[mode] = (state, losses)
    # DDP's reducer holds the process group: drop the models first, so that under DDP the group's threads are joined
    # inside destroy_process_group. Freed later (with this function's locals), gloo's destructor joined a worker
    # thread that waited for the GIL this thread held, and the test hung once. Under FSDP the group stays alive
    # after this too (README.md "Multi-GPU and memory", known issue).
    del model, wrapper, policy, value_model, stats, state
    gc.collect()  # module hooks make reference cycles
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ppo_update_on_two_processes_equals_one_process(world):
    """The PPO update (step 6) on a fixed batch of 16 episodes: one process with 2 micro-batches of 8 and two processes
    with 2 micro-batches of 4 each, under DDP and under FSDP, end with the same weights and losses (every response
    has the same number of valid tokens, so the per-micro-batch means average to the batch mean)."""
    import torch.multiprocessing as mp

    from ppo_tldr import PolicyAndValueWrapper, forward, logprobs_of

    model_path = str(world / "base_model")
    generator = torch.Generator().manual_seed(1)
    query_responses = torch.randint(1, 700, (16, 6 + 5), generator=generator)  # no pad: 5 valid tokens each
    policy, value_model = _policy_and_value(model_path)
    with torch.no_grad():
        logits = forward(policy, query_responses, 10_000).logits[:, 5:-1] / (0.7 + 1e-7)
    no_padding = torch.zeros(16, 5, dtype=torch.bool)
    rollout = dict(query_responses=query_responses, responses=query_responses[:, 6:],
                   logprobs=logprobs_of(logits, query_responses[:, 6:]) - 0.1 * torch.rand(16, 5, generator=generator),
                   values=torch.randn(16, 5, generator=generator), returns=torch.randn(16, 5, generator=generator),
                   advantages=torch.randn(16, 5, generator=generator), padding_mask=no_padding,
                   padding_mask_p1=no_padding)
    wrapper = PolicyAndValueWrapper(policy, value_model)
    stats = _update(wrapper, wrapper, rollout, 8, 2)
    expected_state = wrapper.state_dict()
    expected_losses = [stats[k].mean().item() for k in ("pg_loss", "vf_loss")]

    results = mp.Manager().dict()
    for mode in ["ddp", "fsdp"]:
        port = free_port()
        mp.spawn(_update_in_a_process_group, args=(2, port, mode, model_path, rollout, results), nprocs=2)
    initial = PolicyAndValueWrapper(*_policy_and_value(model_path)).state_dict()
    assert max((expected_state[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # the update moved
    for mode in ["ddp", "fsdp"]:
        state, losses = results[mode]
        assert losses == pytest.approx(expected_losses, rel=1e-5), mode
        assert max((state[k] - expected_state[k]).abs().max().item() for k in expected_state) < 1e-5, mode


def test_validation_prompts_are_distinct_across_processes_and_the_same_every_update():
    """As the reference's sharded, unshuffled validation loader (first batch re-read each update): rank k gets
    rows [k * N, (k + 1) * N)."""
    shards = [validation_indices(10, 2, rank, 4) for rank in range(4)]
    assert shards == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert validation_indices(10, 2, 0, 1) == [0, 1]
    with pytest.raises(ValueError, match="--local-eval-batch-size 3 x 4 process"):
        validation_indices(10, 3, 0, 4)
    with pytest.raises(ValueError, match="--local-eval-batch-size 0"):
        validation_indices(10, 0, 0, 1)


def test_truncate_and_score_reads_the_truncated_text_and_replaces_a_missing_eos(world, reward_model):
    """Rollout step 3 [D23.2, D23.3]: the response is cut after its first EOS and the reward model scores query +
    truncated text; a response without EOS gets --missing-eos-score, or keeps its score when that is None."""
    from ppo_tldr import load_tokenizer, truncate_and_score

    from value_head import ScalarModel, get_reward

    tokenizer = load_tokenizer(str(world / "base_model"), "--sft-model-path")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    scorer = ScalarModel.from_pretrained(str(reward_model)).eval()
    query = torch.tensor([[pad, 5, 6], [7, 8, 9]])
    response = torch.tensor([[10, eos, 11, 12], [10, 11, 12, 13]])
    with torch.no_grad():
        truncated, score = truncate_and_score(scorer, query, response, tokenizer, -1.0)
        _, kept = truncate_and_score(scorer, query, response, tokenizer, None)
        expected = get_reward(scorer, torch.cat([query, truncated], 1), pad, 3)[1]
    assert truncated.tolist() == [[10, eos, pad, pad], [10, 11, 12, 13]]
    assert score[0].item() == pytest.approx(expected[0].item(), abs=1e-5) and score[1].item() == -1.0
    assert kept.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert expected[1].item() != -1.0


# ---------------------------------------------------------------- savings: the same numbers ----------------------
def test_trim_left_padding_and_length_groups_by_hand():
    from ppo_tldr import length_groups, trim_left_padding, trim_right_padding

    tokens = torch.tensor([[PAD, PAD, 1, 2], [PAD, 3, 4, PAD], [PAD, PAD, PAD, 5]])
    assert trim_left_padding(tokens, PAD).tolist() == [[PAD, 1, 2], [3, 4, PAD], [PAD, PAD, 5]]  # one common column
    assert trim_left_padding(tokens[:1], PAD).tolist() == [[1, 2]]
    assert trim_left_padding(torch.full((2, 3), PAD), PAD).tolist() == [[PAD], [PAD]]  # all pad: the last column
    right = torch.tensor([[1, 2, PAD, PAD], [3, PAD, 4, PAD]])
    assert trim_right_padding(right, PAD).tolist() == [[1, 2, PAD], [3, PAD, 4]]
    assert trim_right_padding(right[:, :3], PAD).tolist() == [[1, 2, PAD], [3, PAD, 4]]  # nothing to drop
    assert trim_right_padding(torch.full((2, 3), PAD), PAD).tolist() == [[PAD], [PAD]]  # all pad: the first column
    # token counts 2, 2, 1, 3: sorted (stable) 2, 0, 1, 3; in order without grouping
    queries = torch.tensor([[PAD, 1, 2], [PAD, 3, 4], [PAD, PAD, 5], [6, 7, 8]])
    assert [c.tolist() for c in length_groups(queries, 2, PAD, True)] == [[2, 0], [1, 3]]
    assert [c.tolist() for c in length_groups(queries, 2, PAD, False)] == [[0, 1], [2, 3]]


def _padded_queries(lengths, width, generator, pad):
    """Left-padded queries of the given lengths at `width` columns, tokens in [1, 700)."""
    queries = torch.full((len(lengths), width), pad)
    for row, length in enumerate(lengths):
        queries[row, width - length :] = torch.randint(1, 700, (length,), generator=generator)
    return queries


def test_trimmed_and_grouped_rollout_chunks_give_the_same_logprobs_values_and_scores(world, reward_model):
    """Rollout steps 1-3 on left-padded queries with common padding: generation (same seed: same tokens, same
    log-probabilities), the reference's log-probabilities, the values and the reward model's scores are the same with
    the common padding dropped as at the full width (read there at [Q - 1 : -1], the positions before the change), and
    the same for chunks grouped by query length (put back in order) as for chunks in order; the scores also with the
    trailing columns that are pad in every row dropped."""
    from ppo_tldr import (forward, generate, length_groups, logprobs_of, reference_logprobs_and_values,
                          trim_left_padding, trim_right_padding)

    from value_head import ScalarModel, get_reward

    pad, width, response_length = 767, 16, 5  # pad: in the tiny vocabulary (768)
    policy, value_model = _policy_and_value(str(world / "base_model"))
    reward = ScalarModel.from_pretrained(str(reward_model))
    generator = torch.Generator().manual_seed(3)
    queries = _padded_queries([4, 9, 3, 7], width, generator, pad)  # 7 columns of common padding
    responses = torch.randint(1, 700, (4, response_length), generator=generator)
    responses[0, 3:], responses[2, 1:], responses[:, 4] = pad, pad, pad  # responses that ended early
    full = torch.cat([queries, responses], 1)
    trimmed = trim_left_padding(full, pad)
    assert trimmed.shape == (4, 9 + response_length)
    with torch.no_grad():
        # 1. generation
        torch.manual_seed(5)
        full_generated, full_logits = generate(policy, queries, pad, response_length, 0.7)
        torch.manual_seed(5)
        generated, logits = generate(policy, trim_left_padding(queries, pad), pad, response_length, 0.7)
        assert torch.equal(generated[:, -response_length:], full_generated[:, -response_length:])
        torch.testing.assert_close(logprobs_of(logits, generated[:, -response_length:]),
                                   logprobs_of(full_logits, full_generated[:, -response_length:]), rtol=1e-5, atol=1e-5)
        # 2. reference log-probabilities and values: as computed before the change, at the full width
        ref_logits = forward(policy, full, pad).logits[:, width - 1 : -1] / (0.7 + 1e-7)
        expected_ref_logprobs = logprobs_of(ref_logits, responses)
        expected_values = get_reward(value_model, full, pad, width)[0][:, width - 1 : -1]
        for query_responses in (full, trimmed):
            ref_logprobs, values = reference_logprobs_and_values(policy, value_model, query_responses, response_length,
                                                                 pad, 0.7)
            torch.testing.assert_close(ref_logprobs, expected_ref_logprobs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
        # 3. scores
        expected_scores = get_reward(reward, full, pad, width)[1]
        torch.testing.assert_close(get_reward(reward, trimmed, pad, trimmed.size(1) - response_length)[1],
                                   expected_scores, rtol=1e-5, atol=1e-5)
        both = trim_right_padding(trimmed, pad)  # the last column is pad in every row
        assert both.shape == (4, 9 + response_length - 1)
        torch.testing.assert_close(get_reward(reward, both, pad, 9)[1], expected_scores, rtol=1e-5, atol=1e-5)
        # chunks of 2 grouped by length (rows 2, 0 and 3, 1) vs in order, each chunk trimmed
        for group in (False, True):
            chunks = length_groups(queries, 2, pad, group)
            assert [c.tolist() for c in chunks] == ([[2, 0], [3, 1]] if group else [[0, 1], [2, 3]])
            parts = [reference_logprobs_and_values(policy, value_model, trim_left_padding(full[c], pad),
                                                   response_length, pad, 0.7) for c in chunks]
            unsort = torch.argsort(torch.cat(chunks))
            torch.testing.assert_close(torch.cat([p[0] for p in parts])[unsort], expected_ref_logprobs, rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(torch.cat([p[1] for p in parts])[unsort], expected_values, rtol=1e-5, atol=1e-5)
            scores = [get_reward(reward, trim_right_padding(trim_left_padding(full[c], pad), pad), pad,
                                 trim_left_padding(queries[c], pad).size(1))[1] for c in chunks]
            torch.testing.assert_close(torch.cat(scores)[unsort], expected_scores, rtol=1e-5, atol=1e-5)


def test_ppo_update_with_micro_batches_trimmed_equals_the_full_width(world, monkeypatch):
    """ppo_update on 8 episodes with left-padded queries of different lengths (so the micro-batches drop different
    numbers of columns) and responses that end early: the same losses, statistics and weights after one update as
    the update at the full width (trimming switched off); and the positions read from the end are those the full
    width read, [Q - 1 : -1]."""
    import ppo_tldr
    from ppo_tldr import PolicyAndValueWrapper, forward, logprobs_of

    from value_head import get_reward

    pad, width, response_length = 767, 16, 5  # pad: in the tiny vocabulary (768)
    model_path = str(world / "base_model")
    generator = torch.Generator().manual_seed(2)
    queries = _padded_queries([4, 9, 3, 7, 12, 5, 2, 8], width, generator, pad)
    responses = torch.randint(1, 700, (8, response_length), generator=generator)
    responses[0, 3:], responses[5, 1:] = pad, pad
    query_responses = torch.cat([queries, responses], 1)
    padding_mask = responses == pad
    padding_mask_p1 = torch.zeros_like(padding_mask)
    padding_mask_p1[0, 4:], padding_mask_p1[5, 2:] = True, True
    policy, value_model = _policy_and_value(model_path)
    with torch.no_grad():
        logits = forward(policy, query_responses, pad).logits[:, width - 1 : -1] / (0.7 + 1e-7)
    rollout = dict(query_responses=query_responses, responses=responses,
                   logprobs=logprobs_of(logits, responses) - 0.1 * torch.rand(8, 5, generator=generator),
                   values=torch.randn(8, 5, generator=generator), returns=torch.randn(8, 5, generator=generator),
                   advantages=torch.randn(8, 5, generator=generator), padding_mask=padding_mask,
                   padding_mask_p1=padding_mask_p1)
    results = {}
    for trimmed in (True, False):
        if not trimmed:
            monkeypatch.setattr(ppo_tldr, "trim_left_padding", lambda tokens, pad_token_id: tokens)
        torch.manual_seed(7)  # the same micro-batches (ppo_update's randperm)
        wrapper = PolicyAndValueWrapper(*_policy_and_value(model_path))
        stats = _update(wrapper, wrapper, rollout, 4, 2, pad)
        results[trimmed] = (stats, wrapper.state_dict())
    (stats, state), (full_stats, full_state) = results[True], results[False]
    for name in full_stats:
        torch.testing.assert_close(stats[name], full_stats[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = PolicyAndValueWrapper(*_policy_and_value(model_path)).state_dict()
    assert max((full_state[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # the update moved
    assert max((state[k] - full_state[k]).abs().max().item() for k in full_state) < 1e-5
    # the positions read from the end are those of the full width, [Q - 1 : -1]: with the rollout's log-probabilities
    # and values computed there (one micro-batch, trimmed), the ratio is 1 and the value loss is that of the returns'
    # offsets alone
    monkeypatch.undo()
    with torch.no_grad():
        values = get_reward(value_model, query_responses, pad, width)[0][:, width - 1 : -1]
    offsets = torch.randn(8, 5, generator=generator)
    exact = dict(rollout, logprobs=torch.masked_fill(logprobs_of(logits, responses), padding_mask, INVALID_LOGPROB),
                 values=torch.masked_fill(values, padding_mask_p1, 0), returns=values + offsets)
    wrapper = PolicyAndValueWrapper(*_policy_and_value(model_path))
    stats = _update(wrapper, wrapper, exact, 8, 1, pad)
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["vf_loss"].item() == pytest.approx(0.5 * (offsets**2)[~padding_mask_p1].mean().item(), rel=1e-5)
