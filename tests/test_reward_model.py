"""Tests of reward_model.py: the formulas by hand, the data layout, the sharding, bad inputs, a smoke run on the
tiny world (loss falls, the saved model loads and scores the reference summaries 0 on average) and a torchrun run."""

import json
import math
import re
import shutil

import datasets
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXModel

import reward_model as rm
from conftest import audited_run, raises_in_process, run_ok, world_args
from value_head import ScalarModel, get_reward

PAD, EOS = 99, 0


def world_cli(world, output_dir, *extra):
    return ["reward_model.py", *world_args(world, "reward_model.py"), "--output-dir", str(output_dir),
            "--query-length", "128", "--response-length", "64", *extra]


# ------------------------------------------------------------ formulas ---------------------------------------
def test_pairwise_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, -1.0])  # margins 2, -1, 0
    loss, accuracy = rm.pairwise_loss_and_accuracy(chosen, rejected)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # 0.7111
    assert accuracy.item() == pytest.approx(1 / 3)  # a tie is not a correct pair
    swapped, _ = rm.pairwise_loss_and_accuracy(rejected, chosen)
    assert swapped.item() > loss.item()


def test_cosine_to_zero():
    f = rm.cosine_to_zero(10)
    assert f(0) == pytest.approx(1.0) and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0, abs=1e-12)


def test_normalization_stats_by_hand():
    bias, stats = rm.normalization_stats([1.0, 2.0, 3.0, 6.0])
    assert bias == pytest.approx(3.0)
    assert stats["mean"] == pytest.approx(0.0, abs=1e-12)
    assert stats["std"] == pytest.approx(math.sqrt(14 / 3))  # sample std of -2, -1, 0, 3
    assert (stats["min"], stats["max"]) == (pytest.approx(-2.0), pytest.approx(3.0))


def test_eval_metrics_breakdowns_by_hand():
    def row(c, r, split, batch, confidence):
        return dict(reward_chosen=c, reward_rejected=r, split=split, batch=batch, confidence=confidence)

    rows = [row(1.0, 0.0, "valid1", "b1", 9), row(0.0, 1.0, "valid1", "b2", 9), row(2.0, -2.0, "valid2", "b2", 1),
            row(0.5, 0.5, "valid2", "b2", None)]
    m = rm.eval_metrics(rows, "validation")
    assert m["eval/validation/accuracy"] == pytest.approx(0.5)
    assert m["eval/validation/reward_chosen"] == pytest.approx(3.5 / 4)
    assert m["eval/validation/reward_rejected"] == pytest.approx(-0.5 / 4)
    assert m["eval/validation/accuracy/split/valid1"] == pytest.approx(0.5)
    assert m["eval/validation/accuracy/split/valid2"] == pytest.approx(0.5)
    assert m["eval/validation/accuracy/batch/b1"] == 1.0
    assert m["eval/validation/accuracy/batch/b2"] == pytest.approx(1 / 3)
    assert m["eval/validation/accuracy/confidence/9"] == pytest.approx(0.5)
    assert m["eval/validation/accuracy/confidence/1"] == 1.0
    assert not any(k.endswith("/None") for k in m)  # a missing confidence is left out of the breakdown


# ------------------------------------------------------------ data layout and readout ------------------------
def test_pair_batch_stacks_chosen_then_rejected_right_padded():
    pairs = [dict(query_chosen=[5, 6, 7, EOS], query_rejected=[5, 6, EOS]),
             dict(query_chosen=[8, EOS], query_rejected=[8, 9, 10, 11, EOS])]
    batch = rm.pair_batch(pairs, 6, PAD)
    assert batch.tolist() == [[5, 6, 7, EOS, PAD, PAD], [8, EOS, PAD, PAD, PAD, PAD],
                              [5, 6, EOS, PAD, PAD, PAD], [8, 9, 10, 11, EOS, PAD]]


def test_reward_is_read_at_the_eos():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)
    model = ScalarModel(GPTNeoXModel(config)).eval()
    pairs = [dict(query_chosen=[5, 6, 7, EOS], query_rejected=[5, 6, EOS]),
             dict(query_chosen=[8, EOS], query_rejected=[8, 9, 10, 11, EOS])]
    with torch.no_grad():
        reward_logits, scores, lengths = get_reward(model, rm.pair_batch(pairs, 7, PAD), PAD, context_length=0)
        _, alone, _ = get_reward(model, torch.tensor([[5, 6, 7, EOS]]), PAD, context_length=0)
    assert lengths.tolist() == [3, 1, 2, 4]  # the EOS of each sequence [D12]
    torch.testing.assert_close(scores, reward_logits[torch.arange(4), torch.tensor([3, 1, 2, 4])])
    torch.testing.assert_close(scores[0], alone[0], atol=1e-5, rtol=1e-5)  # right padding changes nothing


@pytest.fixture(scope="module")
def tokenizer(world):
    return rm.load_tokenizer(str(world / "base_model"), "--sft-model-path")


def raw_row(choice, texts, post="my mom hid my keys.\ni feel sad."):
    return dict(info=dict(id="t3_x", post=post, title="my mom hid my keys", subreddit="tifu"),
                summaries=[dict(text=t, policy="p", note="") for t in texts], choice=choice, batch="batch3",
                split="train", extra=dict(confidence=7))


def test_tokenize_pairs_raw_format(tokenizer):
    rows = datasets.Dataset.from_list([raw_row(1, [" a bad one.", " my mom hid my keys."]),
                                       raw_row(0, [" my mom hid my keys.", " word" * 80])])
    assert rm.preference_format(rows, "x") == "openai"
    pairs, dropped = rm.tokenize_pairs(tokenizer, rows, "openai", 128, 20, 1919)
    assert dropped == 1 and len(pairs) == 1  # the 80-word response is over 20 tokens
    p, eos = pairs[0], tokenizer.eos_token_id
    query = rm.tokenize_queries(tokenizer, [rows[0]["info"]], 128)[0]
    assert p["chosen"] == " my mom hid my keys." and p["rejected"] == " a bad one."  # summaries[choice] is chosen
    assert p["query_chosen"] == query + tokenizer.encode(" my mom hid my keys.") + [eos]
    assert p["query_rejected"] == query + tokenizer.encode(" a bad one.") + [eos]
    assert (p["id"], p["split"], p["batch"], p["confidence"]) == ("t3_x", "train", "batch3", 7)


def test_tokenize_pairs_cnndm_row_uses_the_article_format_and_its_own_length(tokenizer):
    """A CNN/DM row: "Article:\n{article}\n\nTL;DR:\n" cut at the article's last newline to --cnndm-query-length
    (here 40 tokens, longer than --query-length 16, which is for posts), read without its trailing newline."""
    article = "my dad lost my car.\n" * 20
    row = dict(raw_row(0, [" my dad lost my car.", " a bad one."]), batch="batch0_cnndm")
    row["info"] = dict(id="cnn1", post=None, title=None, subreddit=None, article=article)
    [p], dropped = rm.tokenize_pairs(tokenizer, datasets.Dataset.from_list([row]), "openai", 16, 20, 40)
    query = p["query_chosen"][: -len(tokenizer.encode(" my dad lost my car.")) - 1]
    text = tokenizer.decode(query)
    assert dropped == 0 and query == rm.tokenize_article(tokenizer, article, 40) and 16 < len(query) < 40
    assert text.startswith("Article:\nmy dad lost my car.\n") and text.endswith("my dad lost my car.\n\nTL;DR:")
    assert len(tokenizer.encode(text + "\n")) <= 40 < len(tokenizer.encode(text.replace("\n\nTL;DR:", "\nmy dad lost my car.\n\nTL;DR:\n")))


def test_tokenize_pairs_standard_format(tokenizer):
    rows = datasets.Dataset.from_list([dict(prompt="TL;DR:", chosen=" good", rejected=" bad")])
    assert rm.preference_format(rows, "x") == "standard"
    [p], dropped = rm.tokenize_pairs(tokenizer, rows, "standard", 16, 8, 1919)
    assert dropped == 0 and p["query_chosen"] == tokenizer.encode("TL;DR:") + tokenizer.encode(" good") + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="--query-length 2"):
        rm.tokenize_pairs(tokenizer, rows, "standard", 2, 8, 1919)
    with pytest.raises(ValueError, match=r"--label-dataset \(or the standard format.*lacks the column\(s\) \['info'"):
        rm.preference_format(datasets.Dataset.from_list([dict(prompt="a", chosen="b")]), "--label-dataset")


# ------------------------------------------------------------ sharding ---------------------------------------
def test_rank_batch_indices_follow_the_seed_and_refuse_an_uneven_split():
    """The plumbing block's per-process slicing, which reward_model.py trains with over one pass (its other properties:
    tests/test_sft.py): another seed, another shuffle; a global batch the processes cannot split evenly is refused."""
    single = [rm.rank_batch_indices(100, 16, u, 0, 1, 7) for u in range(6)]
    assert single != [rm.rank_batch_indices(100, 16, u, 0, 1, 8) for u in range(6)]
    with pytest.raises(ValueError, match="--batch-size over the number of processes: 16 is not divisible by 3"):
        rm.rank_batch_indices(100, 16, 0, 0, 3, 7)


# ------------------------------------------------------------ bad inputs -------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "24", "--local-micro-batch-size", "16"], "--batch-size / (--local-micro-batch-size"),
    (["--response-length", "0"], "--response-length must be positive"),
    (["--fsdp"], "--fsdp shards the model over processes: launch with torchrun"),
    (["--sft-model-path", "/nonexistent/sft"], "--sft-model-path"),
])
def test_bad_arguments_fail_fast(world, tmp_path, extra, message):
    raises_in_process(*world_cli(world, tmp_path / "out"), *extra, match=re.escape(message))
    assert not (tmp_path / "out").exists()  # failed before anything was written


def test_missing_preference_column_is_named(world, tmp_path):
    rows = datasets.load_dataset(str(world / "tldr_preference"), split="train").remove_columns(["choice"])
    (tmp_path / "bad" / "data").mkdir(parents=True)
    rows.to_parquet(str(tmp_path / "bad" / "data" / "train-00000-of-00001.parquet"))
    raises_in_process(*world_cli(world, tmp_path / "out"), "--label-dataset", tmp_path / "bad", match=r"\['choice'\]")


# ------------------------------------------------------------ smoke run on the tiny world --------------------
@pytest.mark.slow
def test_smoke_run_trains_normalises_and_saves(world, tmp_path):
    out = tmp_path / "rm"
    result = run_ok(*world_cli(world, out, "--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "16",
                               "--local-eval-batch-size", "32", "--num-normalization-samples", "256"))
    assert "0 dropped" in result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/rm/loss" in m]
    assert len(train) == 16 and train[-1]["train/episode"] == 512  # 512 pairs / 32 per update
    losses = [m["train/rm/loss"] for m in train]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.02  # the loss falls
    assert train[0]["train/rm/lr"] == pytest.approx(3e-4) and train[-1]["train/rm/lr"] < 1e-5  # cosine to 0
    final = {k: v for m in metrics if "train/rm/loss" not in m for k, v in m.items()}
    assert abs(final["normalization/mean"]) < 1e-6 and final["normalization/std"] > 0
    assert final["eval/left_right_padding_diff"] < 1e-4  # [D14]: numerical only
    for split, n in [("validation", 128), ("validation_cnndm", 32)]:
        rows = [json.loads(line) for line in (out / f"eval_{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n and len({r["id"] for r in rows}) == n  # one row per evaluated pair
        assert set(rows[0]) == {"id", "query", "chosen", "rejected", "reward_chosen", "reward_rejected", "split",
                                "batch", "confidence"}
        accuracy = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / n
        assert final[f"eval/{split}/accuracy"] == pytest.approx(accuracy)
        assert f"eval/{split}/accuracy/batch/{rows[0]['batch']}" in final
        assert f"eval/{split}/accuracy/confidence/{rows[0]['confidence']}" in final
    assert final["eval/validation/accuracy"] > 0.55

    # the saved model reloads, keeps its bias, and scores the reference summaries 0 on average [D15]
    model = ScalarModel.from_pretrained(str(out)).eval()
    assert model.bias == pytest.approx(final["normalization/bias"])
    tokenizer = rm.load_tokenizer(str(out), "--sft-model-path")
    refs = datasets.load_dataset(str(world / "tldr_sft"), split="train").select(range(256))
    sequences = [rm.right_pad(q + tokenizer.encode(" " + r["summary"]) + [tokenizer.eos_token_id], 192,
                              tokenizer.pad_token_id) for q, r in zip(rm.tokenize_queries(tokenizer, refs, 128), refs)]
    with torch.no_grad():
        _, scores, _ = get_reward(model, torch.tensor(sequences), tokenizer.pad_token_id, context_length=0)
    assert abs(scores.mean().item()) < 1e-4
    assert scores.std().item() == pytest.approx(final["normalization/std"], rel=1e-3)


@pytest.mark.slow
def test_torchrun_two_processes(world, tmp_path):
    out = tmp_path / "rm_ddp"
    result = run_ok(*world_cli(world, out, "--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "8",
                               "--total-episodes", "64", "--num-eval-samples", "8", "--num-normalization-samples", "32"),
                    torchrun=True)
    firsts = {}
    for rank, first in re.findall(r"\[rank (\d)/2\] trains on 32 pairs \(first indices \[([\d, ]+)\]\); the 2 shards "
                                  r"are disjoint", result.stdout):
        firsts[rank] = {int(i) for i in first.split(",")}
    assert set(firsts) == {"0", "1"} and not firsts["0"] & firsts["1"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/rm/loss" in m for m in metrics) == 2  # 64 pairs / 32 per update, logged once (rank 0)
    assert len((out / "eval_validation.jsonl").read_text().splitlines()) == 8  # both ranks' rows, gathered
    assert (out / "value_head.json").exists()


@pytest.mark.slow
def test_fsdp_shards_and_matches_ddp_and_resumes(world, tmp_path):
    """--fsdp on two gloo processes: each holds about half of the parameters; training, the normalisation (33
    summaries: 3 chunks on one process, 2 on the other) and the evaluation (7 pairs) match the DDP run, head and bias
    included; rolled back to its update-2 checkpoint and resumed, it ends with the same bytes. The FSDP run's
    collectives are audited: every tensor entering one is on the compute device, as NCCL requires."""
    from safetensors.torch import load_file

    def cli(out, *extra):
        return world_cli(world, out, "--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "8",
                         "--local-eval-batch-size", "8", "--total-episodes", "96", "--num-eval-samples", "7",
                         "--num-normalization-samples", "33", "--checkpoint-every", "2", "--keep-checkpoints", "2",
                         *extra)

    def read(out):
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights = {**load_file(str(out / "model.safetensors")), **load_file(str(out / "value_head.safetensors"))}
        return metrics, weights, json.loads((out / "value_head.json").read_text())["bias"]

    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    result = run_ok(*cli(ddp), torchrun=True)
    records, result = audited_run(*cli(fsdp, "--fsdp"), audit_dir=tmp_path / "audit")
    assert all(r["checked"].get("broadcast", 0) > 0 for r in records)  # the scalar head's broadcast was checked
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP holds (\d+) of the (\d+)", result.stdout)]
    assert len(held) == 2 and sum(h for h, _ in held) == held[0][1] and all(h < total for h, total in held)

    (metrics_ddp, weights_ddp, bias_ddp), (metrics_fsdp, weights_fsdp, bias_fsdp) = read(ddp), read(fsdp)
    assert len(metrics_fsdp) == len(metrics_ddp) == 6  # 3 updates, normalisation, 2 validation splits
    for a, b in zip(metrics_ddp, metrics_fsdp):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert set(weights_fsdp) == set(weights_ddp)
    assert max((weights_fsdp[k] - weights_ddp[k]).abs().max().item() for k in weights_ddp) < 1e-5
    assert bias_fsdp == pytest.approx(bias_ddp, rel=1e-5)
    rows = [json.loads(line)["id"] for line in (fsdp / "eval_validation.jsonl").read_text().splitlines()]
    assert len(set(rows)) == 7

    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000003")
    (resumed / "model.safetensors").unlink()
    result = run_ok(*cli(resumed, "--fsdp", "--resume"), torchrun=True)
    assert "resumed from update 2" in result.stdout
    assert (resumed / "model.safetensors").read_bytes() == (fsdp / "model.safetensors").read_bytes()
    assert read(resumed)[0] == metrics_fsdp
