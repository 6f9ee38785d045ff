"""sft.py: query formatting and truncation [D2.2], response format [D3], loss mask [D9], ROUGE, sharding,
bad-input errors, a smoke run on the tiny world and a 2-process torchrun run that must match it."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import sft
from conftest import audited_run, raises_in_process, read_jsonl, run_ok, world_args

# Tiny-world settings that learn quickly from random init: 20 updates of 32, crossing into a second epoch; micro-batches
# of 8, so that the 2-process run accumulates too (2 per rank, under no_sync) and still matches 4 in one process.
SMOKE = ["--query-length", "128", "--batch-size", "32", "--local-micro-batch-size", "8", "--lr", "3e-3",
         "--num-train-epochs", "2", "--total-episodes", "640", "--num-eval-samples", "16"]


class CharTokenizer:
    """One token per character, EOS = 0: token counts can be worked out by hand."""

    eos_token_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, tokens):
        return "".join(chr(t) for t in tokens)

    def __call__(self, texts):  # batch encoding, as a Hugging Face tokenizer
        return {"input_ids": [self.encode(text) for text in texts]}


def info(post):
    return dict(subreddit="tifu", title="t", post=post, summary="s")


# ------------------------------------------------------------ data ---------------------------------------------
def test_query_format():
    assert sft.format_query(info("hello")) == "SUBREDDIT: r/tifu\n\nTITLE: t\n\nPOST: hello\n\nTL;DR:"


def cut_query(post, limit):
    """The query of a post under `limit` tokens [D2.2], decoded (one character per token)."""
    return CharTokenizer().decode(sft.tokenize_queries(CharTokenizer(), [info(post)], limit)[0])


def test_query_truncated_at_last_newline_first():
    post = "line one\nline two\nline three"
    limit = len(sft.format_query(info("line one\nline two")))  # fits once "\nline three" is cut
    assert len(sft.format_query(info(post))) > limit
    assert cut_query(post, limit) == sft.format_query(info("line one\nline two"))  # [D2.2]
    # one token less: cut at the next newline, not a character at a time
    assert cut_query(post, limit - 1) == sft.format_query(info("line one"))


def test_query_without_newline_loses_last_characters():
    assert cut_query("abcdef", len(sft.format_query(info("abcd")))) == sft.format_query(info("abcd"))
    # newline cut first ("ab\ncdef" -> "ab"), then characters ("ab" -> "a")
    assert cut_query("ab\ncdef", len(sft.format_query(info("a")))) == sft.format_query(info("a"))
    assert cut_query("abc", 1000) == sft.format_query(info("abc"))  # untouched


def test_batched_tokenisation_gives_the_ids_of_one_by_one(world):
    """tokenize_queries, in rounds over the whole batch, gives the ids of dpo.py's one-query-at-a-time tokenize_query
    (the same rule [D2.2]), for posts that fit and posts cut once or several times."""
    import dpo

    tokenizer = sft.load_tokenizer(str(world / "base_model"), "--base-model")
    rows = sft.load_data(str(world / "tldr_sft"), "--query-dataset")["train"].to_list()
    one_by_one = [dpo.tokenize_query(tokenizer, row, 96) for row in rows]
    assert sft.tokenize_queries(tokenizer, rows, 96) == one_by_one
    assert rows == sft.load_data(str(world / "tldr_sft"), "--query-dataset")["train"].to_list()  # rows not cut
    over = [len(tokenizer.encode(sft.format_query(row))) - 96 for row in rows]
    assert 0 < sum(o > 0 for o in over) < len(rows) and max(over) > 10  # some fit, some are cut, some several times
    examples = sft.tokenize_examples(tokenizer, rows, 96, prompt_completion=False)
    assert [e["query"] for e in examples] == one_by_one
    assert [e["response"] for e in examples] == [tokenizer.encode(" " + r["summary"]) + [tokenizer.eos_token_id]
                                                 for r in rows]


def test_query_too_short_for_the_format():
    needs = len(sft.format_query(info("")))
    with pytest.raises(ValueError, match=f"--query-length 10 is too short .* needs {needs} tokens"):
        sft.tokenize_queries(CharTokenizer(), [info("abcdef"), info("")], 10)


def test_response_format_and_sequence(world):
    tokenizer = sft.load_tokenizer(str(world / "base_model"), "--base-model")
    row = info("my dad hid my wallet.\ni feel sad.")
    [example] = sft.tokenize_examples(tokenizer, [row], 128, prompt_completion=False)
    query, response = example["query"], example["response"]
    assert example["reference"] == "s"  # the text ROUGE compares with
    assert query == tokenizer.encode(sft.format_query(row))
    assert response == tokenizer.encode(" s") + [tokenizer.eos_token_id]  # " " + summary + EOS [D3]
    assert tokenizer.decode(response) == " s<|endoftext|>"
    sequence = sft.right_pad(query + response, 128 + 53, tokenizer.pad_token_id)  # [D4, D5]
    assert len(sequence) == 181 and sequence[:len(query)] == query
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert set(sequence[len(query) + len(response):]) == {tokenizer.pad_token_id}


def test_prompt_completion_used_as_given():
    tok = CharTokenizer()
    row = dict(prompt="Q: x\nA:", completion=" yes")
    [example] = sft.tokenize_examples(tok, [row], 7, prompt_completion=True)
    assert tok.decode(example["query"]) == "Q: x\nA:" and example["response"] == tok.encode(" yes") + [0]
    assert example["reference"] == " yes"
    with pytest.raises(ValueError, match="--query-length 6: a prompt has 7 tokens"):
        sft.tokenize_examples(tok, [row], 6, prompt_completion=True)


# ------------------------------------------------------------ loss ---------------------------------------------
def test_loss_mask_ignores_pad_and_includes_query():
    pad, vocab = 9, 10
    query_responses = torch.tensor([[1, 2, 3, 0, pad, pad]])  # query 1 2, response 3 EOS, right-padded
    logits = torch.zeros(1, 6, vocab)
    loss_sum, n = sft.sft_loss(logits, query_responses, pad)
    assert n.item() == 3  # targets 2 (a query token), 3 and EOS; nothing predicts the first token or a pad
    assert loss_sum.item() == pytest.approx(3 * math.log(vocab))  # uniform logits: log V per target
    # logits at positions whose target is pad do not matter
    logits[0, 3:, :] = torch.randn(3, vocab)
    assert sft.sft_loss(logits, query_responses, pad)[0].item() == pytest.approx(3 * math.log(vocab))
    # the query target counts: a perfect prediction of token 2 from token 1 removes one log V
    logits[0, 0, 2] = 100.0
    assert sft.sft_loss(logits, query_responses, pad)[0].item() == pytest.approx(2 * math.log(vocab), abs=1e-4)


def test_loss_per_sequence_by_hand():
    pad, vocab = 9, 10
    query_responses = torch.tensor([[1, 2, 3, 0, pad, pad], [1, 2, 3, 4, 5, 0]])
    logits = torch.zeros(2, 6, vocab)
    logits[1, 0, 2] = 100.0  # the second sequence predicts its token 2 perfectly
    loss_sums, n = sft.sft_loss(logits, query_responses, pad)
    assert n.tolist() == [3, 5]
    assert loss_sums.tolist() == pytest.approx([3 * math.log(vocab), 4 * math.log(vocab)], abs=1e-4)


def test_update_weighs_each_sequence_equally_whatever_the_micro_batch_size(world):
    """One update on the same 16 sequences of 16 different lengths: micro-batch 1 x 16 accumulation steps (the
    reference's), 16 x 1 and 4 x 4 give the same loss, gradients and weights after an SGD step; one token mean over
    the 16 (the old weighting) gives other gradients."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    path = str(world / "base_model")
    generator = torch.Generator().manual_seed(0)
    examples = [dict(query=torch.randint(1, 500, (4 + i,), generator=generator).tolist(),
                     response=torch.randint(1, 500, (1 + 2 * i,), generator=generator).tolist()) for i in range(16)]

    def update(micro_size, token_mean=False):
        model = AutoModelForCausalLM.from_pretrained(path, config=sft.config_without_dropout(path))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        if token_mean:
            longest = max(len(e["query"]) + len(e["response"]) for e in examples)
            ids = torch.tensor([sft.right_pad(e["query"] + e["response"], longest, 9999) for e in examples])
            loss_sums, num_tokens = sft.sft_loss(sft.forward(model, ids, 9999).logits, ids, 9999)
            loss = loss_sums.sum() / num_tokens.sum()
            loss.backward()
        else:
            loss = sft.accumulate_gradients(model, examples, micro_size, 9999, nullcontext())
        gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
        optimizer.step()
        return loss.item(), gradients, torch.cat([p.detach().flatten() for p in model.parameters()])

    loss_1, gradients_1, weights_1 = update(1)
    for micro_size in (16, 4):
        loss, gradients, weights = update(micro_size)
        assert loss == pytest.approx(loss_1, rel=1e-5)
        torch.testing.assert_close(gradients, gradients_1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weights, weights_1, rtol=1e-5, atol=1e-6)
    _, token_mean_gradients, _ = update(16, token_mean=True)
    assert (token_mean_gradients - gradients_1).abs().max() > 1e-3 * gradients_1.abs().max()


def test_micro_batches_padded_to_their_longest_sequence_train_as_at_the_full_width(world):
    """accumulate_gradients right-pads each micro-batch to its longest sequence, not to query_length + response_length
    (the reference's width): the pad-only columns it drops change the loss and gradients only by float rounding."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    path, pad, full_width = str(world / "base_model"), 9999, 128 + 53
    generator = torch.Generator().manual_seed(1)
    examples = [dict(query=torch.randint(1, 500, (20 + 7 * i,), generator=generator).tolist(),
                     response=torch.randint(1, 500, (3 + 5 * i,), generator=generator).tolist()) for i in range(4)]
    assert max(len(e["query"]) + len(e["response"]) for e in examples) < full_width / 2  # most columns are pad

    def gradients(model):
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    trimmed = AutoModelForCausalLM.from_pretrained(path, config=sft.config_without_dropout(path))
    loss = sft.accumulate_gradients(trimmed, examples, 2, pad, nullcontext())
    full = AutoModelForCausalLM.from_pretrained(path, config=sft.config_without_dropout(path))
    ids = torch.tensor([sft.right_pad(e["query"] + e["response"], full_width, pad) for e in examples])  # (4, 181)
    loss_sums, num_tokens = sft.sft_loss(sft.forward(full, ids, pad).logits, ids, pad)
    assert num_tokens.tolist() == [len(e["query"]) + len(e["response"]) - 1 for e in examples]
    full_loss = (loss_sums / num_tokens).mean()
    full_loss.backward()
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    torch.testing.assert_close(gradients(trimmed), gradients(full), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------ ROUGE --------------------------------------------
def test_rouge_l_counts_the_longest_common_subsequence():
    assert sft.rouge("a b c d", "a c d")["rougeL"] == pytest.approx(2 * 3 / 7)  # LCS 3 of 4 + 3 tokens
    assert sft.rouge("a b c d", "d c b a")["rougeL"] == pytest.approx(2 * 1 / 8)  # LCS 1
    assert sft.rouge("a b a b", "b a b")["rougeL"] == pytest.approx(2 * 3 / 7)  # LCS 3 (b a b), not a prefix match
    assert sft.rouge("", "a")["rougeL"] == 0.0


def test_rouge_hand_worked():
    # prediction 5 tokens, reference 6; unigram overlap 5 (P 1, R 5/6); bigram overlap 3 of 4 / 5; LCS 5
    scores = sft.rouge("the cat on the mat", "The cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(10 / 11)
    assert scores["rouge2"] == pytest.approx(2 / 3)  # P 3/4, R 3/5 -> F 2 * 0.45 / 1.35
    assert scores["rougeL"] == pytest.approx(10 / 11)
    # reversed order: every unigram matches, no bigram, LCS 1 of 4 -> ROUGE-L 1/4
    assert sft.rouge("d c b a", "a b c d") == pytest.approx(dict(rouge1=1.0, rouge2=0.0, rougeL=0.25))
    # repeated tokens are clipped to the reference count: "a a a" vs "a b" -> 1 match, P 1/3, R 1/2 -> F 0.4
    assert sft.rouge("a a a", "a b")["rouge1"] == pytest.approx(0.4)
    assert sft.rouge("", "a b") == dict(rouge1=0.0, rouge2=0.0, rougeL=0.0)


# ------------------------------------------------------------ sharding and arguments ---------------------------
def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    n, batch, seed = 100, 32, 7
    perm0 = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    seen = []
    for update in range(3):  # 3 = floor(100 / 32) updates per epoch
        shards = [sft.rank_batch_indices(n, batch, update, rank, 4, seed) for rank in range(4)]
        assert all(len(s) == 8 for s in shards)
        assert sum(shards, []) == perm0[update * batch:(update + 1) * batch]  # disjoint, in global order
        assert sum(shards, []) == sft.rank_batch_indices(n, batch, update, 0, 1, seed)  # same as one process
        seen += sum(shards, [])
    assert len(set(seen)) == 96  # no row twice within an epoch; the last 4 rows are dropped
    perm1 = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    assert sft.rank_batch_indices(n, batch, 3, 0, 1, seed) == perm1[:batch]  # epoch 2 reshuffled with seed + 1


def args_with(**kwargs):
    defaults = dict(query_length=512, response_length=53, num_train_epochs=1, local_eval_batch_size=16,
                    total_episodes=None, num_eval_samples=None, batch_size=128, local_micro_batch_size=16,
                    checkpoint_every=100, keep_checkpoints=1, fsdp=False)
    return SimpleNamespace(**{**defaults, **kwargs})


def test_check_args():
    assert sft.check_args(args_with(), world_size=1) == 8
    assert sft.check_args(args_with(), world_size=8) == 1
    with pytest.raises(ValueError, match="--response-length must be positive"):
        sft.check_args(args_with(response_length=0), 1)
    with pytest.raises(ValueError, match="--total-episodes"):
        sft.check_args(args_with(total_episodes=0), 1)
    with pytest.raises(ValueError, match="--keep-checkpoints >= 1"):
        sft.check_args(args_with(keep_checkpoints=0), 1)
    with pytest.raises(ValueError, match="--batch-size.*128 is not divisible by 48"):
        sft.check_args(args_with(local_micro_batch_size=16), world_size=3)
    with pytest.raises(ValueError, match="--fsdp shards the model over processes: launch with torchrun"):
        sft.check_args(args_with(fsdp=True), world_size=1)


# ------------------------------------------------------------ bad input (the real command line) ----------------
def test_error_dataset_lacking_columns(world, tmp_path):
    folder = tmp_path / "bad_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(dict(id="a", title="t", post="p")) + "\n")
    raises_in_process("sft.py", "--base-model", world / "base_model", "--query-dataset", folder,
                      match=r"--query-dataset.*\['subreddit', 'summary'\]")


def test_error_model_path_missing(world, tmp_path):
    raises_in_process("sft.py", "--base-model", tmp_path / "no_such_model", "--query-dataset", world / "tldr_sft",
                      match=r"--base-model.*no_such_model.*is not a folder")


def test_error_batch_size_does_not_divide(world):
    raises_in_process("sft.py", *world_args(world, "sft.py"), "--batch-size", "30", "--local-micro-batch-size", "16",
                      match="--batch-size.*30 is not divisible by 16")


# ------------------------------------------------------------ smoke and torchrun -------------------------------
@pytest.fixture(scope="module")
def smoke_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "single"
    result = run_ok("sft.py", *world_args(world, "sft.py"), *SMOKE, "--output-dir", str(out))
    return out, result


@pytest.mark.slow
def test_smoke_loss_falls_and_outputs_load(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = smoke_run
    assert "[sft] 20/20 | loss" in result.stdout and "ETA" in result.stdout
    metrics = read_jsonl(out / "metrics.jsonl")
    train = [m for m in metrics if "train/sft/loss" in m]
    assert [m["train/episode"] for m in train] == [32 * (i + 1) for i in range(20)]
    assert train[-1]["train/sft/lr"] < train[0]["train/sft/lr"] == pytest.approx(3e-3)  # cosine decay
    assert train[-1]["train/sft/loss"] < train[0]["train/sft/loss"] - 1.5  # from ~log(vocab) = 6.6 (4.3 after 20 updates)
    final = metrics[-2] | metrics[-1]
    for key in ["val/loss", "test/loss", "eval/rouge1", "eval/rouge2", "eval/rougeL", "test/rougeL"]:
        assert math.isfinite(final[key]), key
    assert final["val/loss"] < train[0]["train/sft/loss"] - 1.5
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "[PAD]" and model.config.hidden_dropout == 0.0
    for split in ["validation", "test"]:
        rows = read_jsonl(out / f"eval_{split}.jsonl")
        assert len(rows) == 16
        assert set(rows[0]) == {"id", "query", "response", "reference", "has_eos", "response_tokens"}
        assert all(r["query"].endswith("TL;DR:") and isinstance(r["has_eos"], bool) for r in rows)
        assert all(1 <= r["response_tokens"] <= 53 and (r["has_eos"] or r["response_tokens"] == 53) for r in rows)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(world, smoke_run, tmp_path):
    """Same global batch and seed on 2 processes: the same updates as one process up to float error (SFT samples
    nothing while training), which holds only if the two ranks trained on disjoint halves of each batch and the
    loss is scaled right. Evaluation is sharded across the ranks and gathered."""
    from transformers import AutoModelForCausalLM

    single, _ = smoke_run
    out = tmp_path / "ddp"
    result = run_ok("sft.py", *world_args(world, "sft.py"), *SMOKE, "--output-dir", str(out), torchrun=True)
    assert "(2 processes x 2 micro-batches of 8)" in result.stdout
    one, two = read_jsonl(single / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for key in ["train/sft/loss", "val/loss", "test/loss"]:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)  # seen: 1e-7
    weights_one = AutoModelForCausalLM.from_pretrained(single).state_dict()
    weights_two = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)  # seen: 1e-7
    rows_one, rows_two = read_jsonl(single / "eval_test.jsonl"), read_jsonl(out / "eval_test.jsonl")
    assert [r["id"] for r in rows_two] == [r["id"] for r in rows_one]  # gathered in dataset order


@pytest.mark.slow
def test_fsdp_shards_and_matches_ddp_and_resumes(world, tmp_path):
    """--fsdp on two gloo processes: each holds about half of the parameters; training (with accumulation) and the
    evaluation with uneven shares of 5 rows (2 chunks of 2 on one process, 1 on the other) match the DDP run; rolled
    back to its update-2 checkpoint and resumed, it ends with the same bytes. The DDP and FSDP runs' collectives are
    audited: every tensor entering one is on the compute device, as NCCL requires."""
    import re
    import shutil

    from safetensors.torch import load_file

    common = [*world_args(world, "sft.py"), "--query-length",
              "128", "--batch-size", "32", "--local-micro-batch-size", "8", "--lr", "3e-3", "--total-episodes", "96",
              "--num-eval-samples", "5", "--local-eval-batch-size", "2", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    audited_run("sft.py", *common, "--output-dir", str(ddp), audit_dir=tmp_path / "audit_ddp")
    _, result = audited_run("sft.py", *common, "--output-dir", str(fsdp), "--fsdp", audit_dir=tmp_path / "audit_fsdp")
    held = [tuple(map(int, m)) for m in re.findall(r"FSDP holds (\d+) of the (\d+)", result.stdout)]
    assert len(held) == 2 and sum(h for h, _ in held) == held[0][1] and all(h < total for h, total in held)

    one, two = read_jsonl(ddp / "metrics.jsonl"), read_jsonl(fsdp / "metrics.jsonl")
    assert len(one) == len(two) == 5  # 3 updates, then validation and test
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    weights_ddp, weights_fsdp = load_file(str(ddp / "model.safetensors")), load_file(str(fsdp / "model.safetensors"))
    assert max((weights_fsdp[k] - weights_ddp[k]).abs().max().item() for k in weights_ddp) < 1e-5
    for split in ["validation", "test"]:
        rows = read_jsonl(fsdp / f"eval_{split}.jsonl")
        assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(ddp / f"eval_{split}.jsonl")]
        assert len({r["id"] for r in rows}) == 5

    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000003")
    (resumed / "model.safetensors").unlink()
    result = run_ok("sft.py", *common, "--output-dir", str(resumed), "--fsdp", "--resume", torchrun=True)
    assert "resumed from update 2" in result.stdout
    assert (resumed / "model.safetensors").read_bytes() == (fsdp / "model.safetensors").read_bytes()
    assert read_jsonl(resumed / "metrics.jsonl") == two
