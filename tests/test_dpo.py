"""dpo.py: formulas against hand-computed values, invariants, bad inputs, a tiny-world smoke run and a torchrun run."""

import ast
import math
import os
import re
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo
from conftest import audited_run, raises_in_process, read_jsonl, run_ok, world_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dpo.py")
PAD, EOS = 9, 0


def tiny_args(world, output_dir, *extra):
    return [SCRIPT, *world_args(world, "dpo.py"), "--query-length", "128", "--lr", "3e-4",
            "--beta", "0.1", "--batch-size", "32", "--local-micro-batch-size", "16", "--local-eval-batch-size", "32",
            "--output-dir", str(output_dir), *extra]


# ---------------------------------------------------------------- masks and sequence log-probs --------------------
class FixedLogits:
    """A stand-in causal LM: returns the given logits (N, T, V) whatever its input, at the last `logits_to_keep`
    positions (0: all), as a transformers causal LM does."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, logits_to_keep=0, **inputs):
        return SimpleNamespace(logits=self.logits[:, -logits_to_keep:] if logits_to_keep else self.logits)


def test_sequence_logprobs_sum_the_response_tokens_with_eos_and_mask_query_and_pad():
    # the logits at t - 1 give the token at t the probability 1 / primes[t] (logit 0; the other 9 tokens share the
    # rest), so a sum -log(product of primes) names exactly the positions counted
    primes = [2, 3, 5, 7, 11, 13, 17, 19]
    chosen = torch.tensor([[5, 6, 7, 3, 4, EOS, PAD, PAD],  # query of 3 tokens, response "3 4 EOS", then pad
                           [5, 6, 3, EOS, PAD, PAD, PAD, PAD]])  # query of 2 tokens
    rejected = torch.tensor([[5, 6, 7, 8, 3, 4, 4, EOS],  # no pad at all
                             [5, 6, 4, 4, 4, EOS, PAD, PAD]])
    sequences = torch.cat([chosen, rejected])
    logits = torch.zeros(4, 8, 10)
    for row in range(4):
        for t in range(1, 8):
            logits[row, t - 1] = math.log((primes[t] - 1) / 9)
            logits[row, t - 1, sequences[row, t]] = 0.0
    pi_chosen, pi_rejected = dpo.concatenated_logprobs(FixedLogits(logits), chosen, rejected, torch.tensor([3, 2]), PAD)
    assert pi_chosen.tolist() == pytest.approx([-math.log(7 * 11 * 13), -math.log(5 * 7)], abs=1e-5)
    assert pi_rejected.tolist() == pytest.approx([-math.log(7 * 11 * 13 * 17 * 19), -math.log(5 * 7 * 11 * 13)],
                                                 abs=1e-5)


def test_sequence_logprobs_equal_those_of_every_position_on_a_real_model(world):
    """The LM head from the earliest response token on gives the log-probs of the LM head at every position."""
    tokenizer = dpo.load_tokenizer(str(world / "base_model"), "--sft-model-path")
    policy = dpo.load_policy(str(world / "base_model"), tokenizer, torch.device("cpu")).eval()
    rows = datasets.load_dataset(str(world / "tldr_preference"), split="train").select(range(8))
    pairs = [dpo.tokenize_pair(tokenizer, row, 128, "openai", "x", 1919) for row in rows]
    pad = tokenizer.pad_token_id
    chosen, rejected, query_lengths = dpo.collate_pairs({k: [p[k] for p in pairs] for k in pairs[0]}, pad)
    assert len(set(query_lengths.tolist())) > 1 and query_lengths.min() > 0  # queries of different lengths
    with torch.no_grad():
        kept = torch.cat(dpo.concatenated_logprobs(policy, chosen, rejected, query_lengths, pad))
        sequences = torch.cat([chosen, rejected])
        logprobs = torch.log_softmax(dpo.forward(policy, sequences, pad).logits[:, :-1], -1)  # every position
        token_logprobs = logprobs.gather(2, sequences[:, 1:, None])[..., 0]
        positions = torch.arange(1, sequences.size(1))
        mask = (positions >= query_lengths.repeat(2)[:, None]) & (sequences[:, 1:] != pad)
    assert kept.tolist() == pytest.approx((token_logprobs * mask).sum(1).tolist(), abs=1e-4)


def test_collate_pairs_right_pads_to_the_longest_and_keeps_query_lengths():
    pairs = dict(query_token=[[5, 6], [5, 6, 7]], chosen_token=[[3, EOS], [EOS]], rejected_token=[[4, 4, 4, EOS], [EOS]])
    chosen, rejected, query_lengths = dpo.collate_pairs(pairs, PAD)
    assert chosen.tolist() == [[5, 6, 3, EOS, PAD, PAD], [5, 6, 7, EOS, PAD, PAD]]  # 6 = the longest, 2 + 4
    assert rejected.tolist() == [[5, 6, 4, 4, 4, EOS], [5, 6, 7, EOS, PAD, PAD]]
    assert query_lengths.tolist() == [2, 3]


# ---------------------------------------------------------------- losses and accuracy ----------------------------
# Two pairs: h = (pi_c - pi_r) - (ref_c - ref_r) = 2 and -1.
PI_C, PI_R = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
REF_C, REF_R = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -2.0])


def logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type, label_smoothing, expected", [
    ("sigmoid", 0.0, (-logsig(1.0) - logsig(-0.5)) / 2),  # beta h = 1, -0.5
    ("ipo", 0.0, ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2),  # 1 / (2 beta) = 1
    ("label_smoothing", 0.1, (-0.9 * logsig(1.0) - 0.1 * logsig(-1.0) - 0.9 * logsig(-0.5) - 0.1 * logsig(0.5)) / 2),
])
def test_loss_types_on_a_hand_computed_batch(loss_type, label_smoothing, expected):
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(PI_C, PI_R, REF_C, REF_R, 0.5, loss_type, label_smoothing)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.5, -0.5])  # beta * (pi - ref)
    assert rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])


def test_loss_is_a_mean_not_a_sum():
    one, _, _ = dpo.dpo_loss(PI_C[:1], PI_R[:1], REF_C[:1], REF_R[:1], 0.5, "sigmoid", 0.0)
    twice, _, _ = dpo.dpo_loss(PI_C[:1].repeat(2), PI_R[:1].repeat(2), REF_C[:1].repeat(2), REF_R[:1].repeat(2),
                               0.5, "sigmoid", 0.0)
    assert twice.item() == pytest.approx(one.item())


def test_accuracy_counts_an_exact_tie_zero():
    accuracy = dpo.preference_accuracy(torch.tensor([1.0, 0.0, 0.3]), torch.tensor([0.5, 0.0, 0.4]))
    assert accuracy.tolist() == [1.0, 0.0, 0.0]


def test_accuracy_breakdown_counts_a_tie_zero_by_split_batch_and_confidence():
    rows = [dict(reward_chosen=1.0, reward_rejected=0.5, split="valid1", batch="b1", confidence=9),
            dict(reward_chosen=0.2, reward_rejected=0.2, split="valid1", batch="b2", confidence=None),  # a tie
            dict(reward_chosen=0.0, reward_rejected=0.5, split="valid2", batch="b2", confidence=9)]
    metrics = dpo.accuracy_breakdown(rows, "eval/x")
    assert metrics == pytest.approx({
        "eval/x/accuracy": 1 / 3, "eval/x/reward_margin": (0.5 + 0.0 - 0.5) / 3, "eval/x/accuracy/split/valid1": 0.5,
        "eval/x/accuracy/split/valid2": 0.0, "eval/x/accuracy/batch/b1": 1.0, "eval/x/accuracy/batch/b2": 0.0,
        "eval/x/accuracy/confidence/9": 0.5})


def test_policy_equal_to_reference_gives_log2_and_accuracy_zero(world):
    tokenizer = dpo.load_tokenizer(str(world / "base_model"), "--sft-model-path")
    policy = dpo.load_policy(str(world / "base_model"), tokenizer, torch.device("cpu"))
    reference = dpo.load_policy(str(world / "base_model"), tokenizer, torch.device("cpu")).eval().requires_grad_(False)
    rows = datasets.load_dataset(str(world / "tldr_preference"), split="train").select(range(4))
    pairs = [dpo.tokenize_pair(tokenizer, row, 128, "openai", "x", 1919) for row in rows]
    chosen, rejected, query_lengths = dpo.collate_pairs({k: [p[k] for p in pairs] for k in pairs[0]},
                                                        tokenizer.pad_token_id)
    pi = dpo.concatenated_logprobs(policy, chosen, rejected, query_lengths, tokenizer.pad_token_id)
    with torch.no_grad():
        ref = dpo.concatenated_logprobs(reference, chosen, rejected, query_lengths, tokenizer.pad_token_id)
    assert (pi[0] < 0).all() and not torch.equal(pi[0], pi[1])  # real, different log-probs
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(*pi, *ref, 0.05, "sigmoid", 0.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(chosen_rewards, rejected_rewards)  # every pair a tie: accuracy 0 (strict >)
    assert dpo.preference_accuracy(chosen_rewards, rejected_rewards).tolist() == [0.0] * 4
    ipo, _, _ = dpo.dpo_loss(*pi, *ref, 0.05, "ipo", 0.0)
    assert ipo.item() == pytest.approx(1 / (2 * 0.05) ** 2, rel=1e-5)
    loss.backward()  # the policy gets gradients, the reference none
    assert policy.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in reference.parameters())


# ---------------------------------------------------------------- data -------------------------------------------
def test_tokenize_pair_openai_format_takes_the_choice_and_appends_eos(world):
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    row = datasets.load_dataset(str(world / "tldr_preference"), split="train")[0]
    pair = dpo.tokenize_pair(tokenizer, row, 128, "openai", "unused", 1919)
    chosen_text = row["summaries"][row["choice"]]["text"]
    assert chosen_text.startswith(" ") and pair["chosen"] == chosen_text
    assert pair["rejected"] == row["summaries"][1 - row["choice"]]["text"]
    assert pair["chosen_token"] == tokenizer.encode(chosen_text) + [tokenizer.eos_token_id]
    assert pair["query_token"] == dpo.tokenize_query(tokenizer, row["info"], 128)
    assert pair["query"].endswith("TL;DR:") and pair["id"] == row["info"]["id"]
    assert pair["confidence"] == row["extra"]["confidence"] and pair["batch"] == row["batch"]


def test_tokenize_pair_standard_format(world):
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    row = dict(prompt="my dad lost my car. TL;DR:", chosen=" my dad lost my car.", rejected=" i feel sad.")
    pair = dpo.tokenize_pair(tokenizer, row, 128, "standard", "train-7", 1919)
    assert pair["id"] == "train-7" and pair["split"] is None
    assert pair["query_token"] == tokenizer.encode(row["prompt"])
    assert pair["rejected_token"] == tokenizer.encode(" i feel sad.") + [tokenizer.eos_token_id]


def test_tokenize_pair_cnndm_row_uses_the_article_format(world):
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    row = dict(info=dict(id="cnn1", post=None, title=None, subreddit=None, article="my dad lost my car. " * 100),
               summaries=[dict(text=" a."), dict(text=" b.")], choice=1, batch="batch0_cnndm", split="valid2",
               extra=dict(confidence=None))
    pair = dpo.tokenize_pair(tokenizer, row, 16, "openai", "unused", 64)  # --query-length 16 is for posts only
    assert pair["query_token"] == dpo.tokenize_article(tokenizer, row["info"]["article"], 64)
    assert pair["query"].startswith("Article:\n") and pair["query"].endswith("\n\nTL;DR:")
    assert pair["chosen"] == " b." and pair["confidence"] is None


def test_cnndm_query_format_and_cut_at_the_last_newline(world):
    """"Article:\n{article}\n\nTL;DR:\n" within the length, the article cut at its last newline while too long (or by
    one character without a newline), the trailing newline then stripped (the reference's query.strip() + response)."""
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    article = "my dad lost my car.\nmy mom hid my keys.\ni feel sad."
    full = len(tokenizer.encode(f"Article:\n{article}\n\nTL;DR:\n"))
    fits = dpo.tokenize_article(tokenizer, article, full)
    assert tokenizer.decode(fits) == f"Article:\n{article}\n\nTL;DR:"  # whole; no trailing newline
    cut = dpo.tokenize_article(tokenizer, article, full - 1)  # one token too few: the last line goes
    assert tokenizer.decode(cut) == "Article:\nmy dad lost my car.\nmy mom hid my keys.\n\nTL;DR:"
    two_lines = len(tokenizer.encode("Article:\nmy dad lost my car.\nmy mom hid my keys.\n\nTL;DR:\n"))
    assert dpo.tokenize_article(tokenizer, article, two_lines) == cut  # the cut one fits exactly
    limit = len(tokenizer.encode("Article:\nabcdefgh\n\nTL;DR:\n")) - 1  # no newline: the last characters go
    kept = max(k for k in range(9) if len(tokenizer.encode(f"Article:\n{'abcdefgh'[:k]}\n\nTL;DR:\n")) <= limit)
    assert 0 < kept < 8
    assert tokenizer.decode(dpo.tokenize_article(tokenizer, "abcdefgh", limit)) == f"Article:\n{'abcdefgh'[:kept]}\n\nTL;DR:"
    line = "my dad lost my car.\n"  # 7 tokens; 400 lines do not fit 1919, the cut keeps the most lines that do
    text = tokenizer.decode(dpo.tokenize_article(tokenizer, line * 400, 1919))
    lines = text.count(line)
    assert text == "Article:\n" + (line * lines)[:-1] + "\n\nTL;DR:"  # whole lines (the last one's newline cut)
    assert len(tokenizer.encode(text + "\n")) <= 1919 < len(tokenizer.encode(f"Article:\n{line * (lines + 1)}\n\nTL;DR:\n"))
    with pytest.raises(ValueError, match="--cnndm-query-length 3 is too short"):
        dpo.tokenize_article(tokenizer, article, 3)


def test_preference_format_detection():
    standard = datasets.Dataset.from_list([dict(prompt="p", chosen=" a", rejected=" b")])
    assert dpo.preference_format(standard) == "standard"
    with pytest.raises(ValueError, match=r"--label-dataset .*lacks the column\(s\) \['info'"):
        dpo.preference_format(datasets.Dataset.from_list([dict(prompt="p", answer="a")]))


def test_rank_batch_indices_refuses_a_batch_that_does_not_split_over_the_processes():
    # (disjoint, in the shared shuffle's order, last partial batch dropped: tests/test_sft.py)
    with pytest.raises(ValueError, match="--batch-size over the number of processes: 30 is not divisible by 4"):
        dpo.rank_batch_indices(100, 30, 0, 0, 4, seed=1)


# ---------------------------------------------------------------- bad inputs -------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(label_smoothing=0.1), "read only by --loss-type label_smoothing"),
    (dict(loss_type="label_smoothing"), r"needs --label-smoothing in \(0, 0.5\)"),
    (dict(response_length=0), "--response-length must be positive"),
    (dict(beta=0.0), "--beta must be positive"),
    (dict(sft_model_path="/no/such/model"), "--sft-model-path: '/no/such/model' is not a folder"),
    (dict(sft_model_path=ROOT, label_dataset="./no/such/data"), "--label-dataset ./no/such/data: no such file"),
    (dict(total_episodes=10), "smaller than one --batch-size"),
    (dict(fsdp=True), "--fsdp shards the model over processes: launch with torchrun"),
])
def test_validate_args_rejects(changes, message):
    args = dpo.Args(**changes)
    with pytest.raises(ValueError, match=message):
        dpo.validate_args(args, world_size=1)


def test_validate_args_derives_gradient_accumulation():
    args = dpo.Args(sft_model_path=ROOT, batch_size=64, local_micro_batch_size=8)
    assert dpo.validate_args(args, world_size=2) == 4
    with pytest.raises(ValueError, match="number of processes: 64 is not divisible by 48"):
        dpo.validate_args(args, world_size=6)


def test_script_fails_fast_on_a_missing_column(world, tmp_path):
    bad = tmp_path / "bad_preference"
    os.makedirs(bad / "data")
    bad_rows = datasets.Dataset.from_list([dict(prompt="a", answer="b")])
    bad_rows.to_parquet(str(bad / "data" / "train-00000-of-00001.parquet"))
    raises_in_process(*tiny_args(world, tmp_path / "out"), "--label-dataset", bad,
                      match=re.escape("--label-dataset") + ".*" + re.escape("lacks the column(s) ['info', 'summaries', 'choice'"))
    assert not (tmp_path / "out").exists()  # nothing trained or written


# ---------------------------------------------------------------- runs -------------------------------------------
@pytest.mark.slow
def test_smoke_run_on_the_tiny_world(world, tmp_path):
    out = tmp_path / "run"
    result = run_ok(*tiny_args(world, out, "--total-episodes", "256", "--num-eval-samples", "8"))
    assert "kept 512 of 512 pairs" in result.stdout
    metrics = read_jsonl(out / "metrics.jsonl")
    train = [m for m in metrics if "train/rm/loss" in m]
    assert len(train) == 8 and train[-1]["train/episode"] == 256
    assert set(train[0]) == {"step", "train/episode", "train/rm/lr", *(f"train/rm/{k}" for k in dpo.TRAIN_METRICS)}
    # the first update sees policy == reference: loss log 2, every pair a tie, which counts 0
    assert train[0]["train/rm/loss"] == pytest.approx(math.log(2), abs=1e-5) and train[0]["train/rm/accuracy"] == 0.0
    assert train[0]["train/rm/chosen_rewards"] == train[0]["train/rm/rejected_rewards"] == 0.0
    assert train[0]["train/rm/lr"] == pytest.approx(3e-4) and train[-1]["train/rm/lr"] < 0.05 * 3e-4  # cosine to 0
    late = train[-6:]
    assert sum(m["train/rm/loss"] for m in late) / 6 < math.log(2) - 0.02
    assert sum(m["train/rm/reward_margin"] for m in late) / 6 > 0.05
    assert sum(m["train/rm/accuracy"] for m in late) / 6 > 0.5
    assert all(m["train/rm/logps_chosen"] < 0 for m in train)
    evals = {k: v for m in metrics for k, v in m.items() if k.startswith("eval/")}
    assert evals["eval/validation/accuracy"] > 0.55  # the implicit reward ranks held-out pairs above chance
    assert "eval/validation/accuracy/batch/batch11" in evals and "eval/validation/accuracy/confidence/9" in evals
    rows = read_jsonl(out / "eval_validation.jsonl")
    assert len(rows) == 128 and len(read_jsonl(out / "eval_validation_cnndm.jsonl")) == 32
    assert set(rows[0]) == {"id", "query", "chosen", "rejected", "reward_chosen", "reward_rejected", "split", "batch",
                            "confidence"}
    generations = read_jsonl(out / "eval_generations.jsonl")
    sft_validation = datasets.load_dataset(str(world / "tldr_sft"), split="validation")
    assert [g["id"] for g in generations] == sft_validation["id"][:8]
    assert set(generations[0]) == {"id", "query", "response", "reference", "has_eos", "response_tokens"}
    assert all(1 <= g["response_tokens"] <= 128 and (g["has_eos"] or g["response_tokens"] == 128) for g in generations)
    assert generations[0]["reference"] == sft_validation[0]["summary"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.pad_token == "[PAD]" and model.config.hidden_dropout == 0.0
    base = AutoModelForCausalLM.from_pretrained(str(world / "base_model"))
    assert not torch.equal(model.get_output_embeddings().weight, base.get_output_embeddings().weight)  # it trained


@pytest.mark.slow
def test_torchrun_two_processes_disjoint_shards(world, tmp_path):
    out = tmp_path / "ddp"
    result = run_ok(*tiny_args(world, out, "--local-micro-batch-size", "8", "--total-episodes", "128",
                               "--num-eval-samples", "4", "--precompute-ref-logprobs"), torchrun=True)
    pattern = r"\[rank (\d)\] trains on 64 pairs .*first pair indices (\[[\d, ]+\])"
    shards = {int(m.group(1)): ast.literal_eval(m.group(2)) for m in re.finditer(pattern, result.stdout)}
    assert set(shards) == {0, 1} and not set(shards[0]) & set(shards[1])
    train = [m for m in read_jsonl(out / "metrics.jsonl") if "train/rm/loss" in m]
    assert len(train) == 4 and train[0]["train/rm/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert len(read_jsonl(out / "eval_validation.jsonl")) == 128  # both ranks' shards gathered
    assert len(read_jsonl(out / "eval_generations.jsonl")) == 4
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_fsdp_shards_and_matches_ddp_and_resumes(world, tmp_path):
    """--fsdp on two gloo processes: each holds about half of the policy; training (reference on the fly), the
    preference evaluation and the generations for 5 posts (2 chunks of 2 on one process, 1 on the other) match a DDP run with
    precomputed reference log-probs; rolled back to its update-2 checkpoint and resumed, it ends with the same bytes.
    Every run's collectives are audited (tests/device_audit)."""
    import shutil

    from safetensors.torch import load_file

    def torchrun(out, *extra):  # every tensor entering a collective on the compute device, as NCCL requires
        return audited_run(*tiny_args(
            world, out, "--local-micro-batch-size", "8", "--local-eval-batch-size", "2", "--total-episodes", "96",
            "--num-eval-samples", "5", "--eval-response-length", "16", "--checkpoint-every", "2",
            "--keep-checkpoints", "2", *extra), audit_dir=out.parent / f"{out.name}_audit")[1]

    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    torchrun(ddp, "--precompute-ref-logprobs")
    result = torchrun(fsdp, "--fsdp")
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP holds (\d+) of the (\d+)", result.stdout)]
    assert len(held) == 2 and sum(h for h, _ in held) == held[0][1] and all(h < total for h, total in held)
    metrics_ddp, metrics_fsdp = read_jsonl(ddp / "metrics.jsonl"), read_jsonl(fsdp / "metrics.jsonl")
    assert len(metrics_fsdp) == len(metrics_ddp) == 6  # 3 updates, 2 preference splits, the generations
    for a, b in zip(metrics_ddp, metrics_fsdp):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    weights_ddp, weights_fsdp = load_file(str(ddp / "model.safetensors")), load_file(str(fsdp / "model.safetensors"))
    assert max((weights_fsdp[k] - weights_ddp[k]).abs().max().item() for k in weights_ddp) < 1e-5
    for table in ["eval_validation", "eval_generations"]:
        assert [r["id"] for r in read_jsonl(fsdp / f"{table}.jsonl")] == [r["id"] for r in read_jsonl(ddp / f"{table}.jsonl")]
    assert len(read_jsonl(fsdp / "eval_generations.jsonl")) == 5

    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000003")
    (resumed / "model.safetensors").unlink()
    result = torchrun(resumed, "--fsdp", "--resume")
    assert "resumed from update 2" in result.stdout
    assert (resumed / "model.safetensors").read_bytes() == (fsdp / "model.safetensors").read_bytes()
    assert read_jsonl(resumed / "metrics.jsonl") == metrics_fsdp
