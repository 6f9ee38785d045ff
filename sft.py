# See README.md "sft.py" for what this script implements, its tests and its benchmark numbers.
"""Supervised fine-tuning on TL;DR: next-token cross-entropy on query + reference summary [D9].

    python sft.py --output-dir models/sft_pythia-1b  # one GPU: Pythia-1B, the TL;DR SFT data, batch 128, one epoch
    torchrun --nproc-per-node 8 sft.py --local-micro-batch-size 16 --output-dir models/sft_pythia-1b  # 8 x 16 = 128
    python benchmark/offline_world.py --out-dir /tmp/world --size tiny  # CPU; random init: a high lr, several epochs
    HF_HUB_OFFLINE=1 python sft.py --base-model /tmp/world/base_model --query-dataset /tmp/world/tldr_sft \
        --query-length 128 --batch-size 32 --local-micro-batch-size 16 --lr 3e-3 --num-train-epochs 4 \
        --num-eval-samples 32 --output-dir /tmp/world/sft
"""

import gc
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import cached_file


@dataclass
class Args:
    # ---- common block: identical names, order, defaults and docstrings in all four scripts ----
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment; the run is named {exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the experiment; each process uses seed + rank * 100003"""
    track: bool = False
    """log to Weights & Biases (metrics.jsonl in the output folder is written either way)"""
    wandb_project_name: str = "tldr_rlhf"
    """Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """Weights & Biases entity (team); None uses your default"""
    output_dir: Optional[str] = None
    """folder for the saved model, tokenizer, metrics.jsonl and evaluation tables (default: runs/{run name})"""
    run_eval: bool = True
    """evaluate after training and save the evaluation tables"""
    bf16: bool = True
    """bf16 autocast on CUDA, fp32 weights and log-softmax (deviation: the reference trains in pure bf16); CPU: fp32"""
    tf32: bool = False
    """TF32 matmuls on CUDA (faster, a 10-bit mantissa: it changes the numbers); off: full fp32; no effect on CPU"""
    resume: bool = False
    """continue the run in --output-dir from its newest checkpoint (same arguments, same result as without a stop)"""
    checkpoint_every: int = 100
    """checkpoint every N updates (PPO: PPO updates; the others: optimizer updates) and at the end; 0: the end only"""
    keep_checkpoints: int = 1
    """checkpoints kept in {output_dir}/checkpoints (the newest ones)"""
    # ---- end of the common block; then the script's model/data paths, lengths, batch sizes, optimiser, algorithm ----
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """pretrained causal LM to fine-tune (hub id or local folder); its tokenizer gets a [PAD] token"""
    base_model_revision: Optional[str] = None
    """hub branch, tag or commit of --base-model (e.g. a run of the paper's release); None: main; not for a folder"""
    query_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT data (hub id or folder): id, subreddit, title, post, summary or prompt, completion; train/validation/test"""
    query_dataset_revision: Optional[str] = None
    """hub branch, tag or commit of --query-dataset; None: the main branch; not for a local folder"""
    query_length: int = 512
    """maximum query length in tokens; longer TL;DR posts are cut at newlines [D2.2], longer prompts are an error"""
    response_length: int = 53
    """maximum response length in tokens, EOS included (longer references are dropped); tokens generated in eval"""
    total_episodes: Optional[int] = None
    """training sequences (rounded down to whole batches), at most num_train_epochs passes; None: all those passes"""
    num_train_epochs: int = 1
    """passes over the train split (reshuffled each epoch with seed + epoch)"""
    batch_size: int = 128
    """sequences per optimizer update, over all processes (independent of the number of devices)"""
    local_micro_batch_size: int = 1
    """sequences per process per forward/backward; accumulation = batch_size / (micro x number of processes)"""
    local_eval_batch_size: int = 4
    """sequences per process per evaluation forward (loss and generation)"""
    lr: float = 3e-6
    """AdamW learning rate at the first update; decays to 0 along a cosine, no warm-up"""
    eps: float = 1e-5
    """AdamW epsilon"""
    fsdp: bool = False
    """shard parameters, gradients and AdamW states over the processes (FSDP2), not replicate them (DDP); torchrun"""
    num_eval_samples: Optional[int] = None
    """evaluate on the first N rows (sequences) of validation and of test; None = the whole splits"""


# -------------------------------------------------------- common helpers (copied verbatim) ---------------------
def load_tokenizer(path, arg, revision=None):
    """Tokenizer (of `path` at `revision`) with a dedicated [PAD] token: EOS as pad would teach the policy never to
    stop. A tokenizer that already holds [PAD] (the hub's SFT checkpoints) keeps its id."""
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, padding_side="right")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{arg} {path}: its tokenizer has no EOS token; responses must end with one [D3]")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # Pythia: new id 50277, inside the 50304 embedding rows
    return tokenizer


def config_without_dropout(path, revision=None):
    """The model config of `path` (at `revision`), or `path` itself if it is a config, with every dropout probability
    set to 0 [D7]."""
    config = AutoConfig.from_pretrained(path, revision=revision) if isinstance(path, str) else path
    for key in [k for k in config.to_dict() if "dropout" in k and isinstance(getattr(config, k), float)]:
        setattr(config, key, 0.0)
    return config


def load_policy(path, tokenizer, device, revision=None):
    """A causal LM (of `path` at `revision`) in fp32 whatever its stored dtype, dropout disabled [D7]; embeddings
    grow only if the tokenizer outgrew them."""
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, config=config_without_dropout(path, revision),
                                                 dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # only for models without spare rows (Pythia has them)
    return model.to(device)


def format_query(info):
    """The TL;DR query format; no space after "TL;DR:" [D2]."""
    return f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {info['post']}\n\nTL;DR:"


def tokenize_queries(tokenizer, infos, query_length):
    """Token ids of each info's formatted query, not padded; while one is too long, cut its post at the last newline
    (or drop its last character if it has none) and re-tokenise it [D2.2]. In batches: each round re-tokenises only
    the queries still too long (the same ids as one query at a time, much faster)."""
    infos = [dict(info) for info in infos]
    queries, todo = [None] * len(infos), range(len(infos))
    while todo:  # (a Hugging Face tokenizer refuses an empty batch)
        for i, tokens in zip(todo, tokenizer([format_query(infos[i]) for i in todo])["input_ids"]):
            queries[i] = tokens
        todo = [i for i in todo if len(queries[i]) > query_length]
        for i in todo:
            post = infos[i]["post"]
            if not post:
                raise ValueError(f"--query-length {query_length} is too short to hold the query format even with an "
                                 f"empty post (title {infos[i]['title']!r} needs {len(queries[i])} tokens)")
            cut = post.rfind("\n")
            infos[i]["post"] = post[:cut] if cut != -1 else post[:-1]
    return queries


def right_pad(tokens, length, pad_token_id):
    return tokens + [pad_token_id] * (length - len(tokens))


def forward(model, query_responses, pad_token_id, logits_to_keep=0):
    """Causal-LM forward on left/right-padded ids, position ids from the attention mask (deviation: the reference
    passed none; with absolute positions that is a bug, with rotary a numerical difference). `logits_to_keep` = k > 0
    computes the LM head's logits at the last k positions only (0 = all; PPO keeps only the response positions, which
    spares a (B, Q, vocab) tensor)."""
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=logits_to_keep)

@torch.no_grad()
def generate(model, queries, pad_token_id, response_length, temperature):
    """Sample exactly `response_length` tokens at `temperature` with a KV cache; EOS does not stop sampling [D23.1].
    Returns query_responses (B, Q + R) and the sampling logits already divided by the temperature (B, R, V). The
    prefill computes the LM head at the last query position only (the only one sampled from). Under FSDP2 each
    sharded module's parameters are all-gathered once for the whole call instead of once per token (they stay
    gathered through the R forwards) and resharded at the end."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        attention_mask = (queries != pad_token_id).long()
        position_ids = attention_mask.cumsum(1) - attention_mask
        input_ids = torch.masked_fill(queries, queries == pad_token_id, 0)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                       logits_to_keep=1)
        tokens, all_logits = [], []
        for step in range(response_length):
            logits = output.logits[:, -1, :].float() / (temperature + 1e-7)  # (B, V)
            token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            tokens.append(token)
            all_logits.append(logits)
            if step == response_length - 1:
                break  # the last token is not fed back
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            output = model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                           cache=output.cache, use_cache=True)
    finally:  # back to FSDP2's defaults: the top module keeps its parameters after forward, the blocks reshard
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)
    return torch.cat([queries] + tokens, dim=1), torch.stack(all_logits, dim=1)


# -------------------------------------------------------- SFT helpers -------------------------------------------
TLDR_COLUMNS = ["id", "subreddit", "title", "post", "summary"]
PROMPT_COMPLETION_COLUMNS = ["prompt", "completion"]
EVAL_SPLITS = {"validation": ("val/loss", "eval/"), "test": ("test/loss", "test/")}  # split -> loss, ROUGE names


def check_args(args, world_size):
    """Before anything loads: every integer argument positive (or None where allowed), except --seed and the checkpoint
    settings; --fsdp only under torchrun. Returns the gradient accumulation steps."""
    for name, value in vars(args).items():
        if type(value) is int and value <= 0 and name not in ("seed", "checkpoint_every", "keep_checkpoints"):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise ValueError(f"--checkpoint-every must be >= 0 and --keep-checkpoints >= 1, got {args.checkpoint_every} "
                         f"and {args.keep_checkpoints}")
    if args.fsdp and world_size == 1:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N (N > 1)")
    return exact_div(args.batch_size, args.local_micro_batch_size * world_size,
                     f"--batch-size / (--local-micro-batch-size {args.local_micro_batch_size} x {world_size} processes)")


def tokenize_examples(tokenizer, rows, query_length, prompt_completion):
    """Per row its query, response ids and reference text: TL;DR query [D2.2], " " + summary + EOS [D3]; or prompt,
    completion. Tokenised in one batch (the ids one by one would be the same)."""
    if prompt_completion:
        queries, references = tokenizer([r["prompt"] for r in rows])["input_ids"], [r["completion"] for r in rows]
        responses = references
    else:  # [D3]
        queries, references = tokenize_queries(tokenizer, rows, query_length), [r["summary"] for r in rows]
        responses = [" " + summary for summary in references]
    for row, query in zip(rows, queries):
        if len(query) > query_length:  # only a prompt can be: tokenize_queries cuts a post to fit
            raise ValueError(f"--query-length {query_length}: a prompt has {len(query)} tokens (prompts are used as "
                             f"given, never clipped): {row['prompt'][:80]!r}...")
    return [dict(query=query, reference=reference, response=response + [tokenizer.eos_token_id])
            for query, reference, response in zip(queries, references, tokenizer(responses)["input_ids"])]


def sft_loss(logits, query_responses, pad_token_id):
    """Next-token cross-entropy over every non-pad target, query included [D9]: (B,) loss sums, (B,) target counts."""
    labels = query_responses.masked_fill(query_responses == pad_token_id, -100)  # (B, T); pad ignored [D9]
    # predict token t+1 from tokens <= t: the labels shift, not the logits (a slice of these would be copied)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T); the last position has no target
    losses = F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(), reduction="none")  # 0 at -100
    return losses.view(shift_labels.shape).sum(1), (shift_labels != -100).sum(1)


def accumulate_gradients(model, examples, micro_size, pad, autocast):
    """Backward of the mean of the examples' token-mean losses, in micro-batches: each sequence weighs the same [D9]."""
    loss_avg = torch.zeros((), device=next(model.parameters()).device)
    for start in range(0, len(examples), micro_size):
        batch = examples[start : start + micro_size]
        longest = max(len(e["query"]) + len(e["response"]) for e in batch)  # trailing pad columns change no output
        query_responses = torch.tensor([right_pad(e["query"] + e["response"], longest, pad) for e in batch],
                                       device=loss_avg.device)  # (B, <= Q + R), right-padded [D4, D5]
        sync = start + micro_size >= len(examples)
        if isinstance(model, FSDPModule):  # FSDP: the reduce-scatter switched off before the last micro-batch
            model.set_requires_gradient_sync(sync)
        with nullcontext() if sync or not isinstance(model, DDP) else model.no_sync():  # DDP: all-reduce on the last
            with autocast:
                loss_sums, num_tokens = sft_loss(forward(model, query_responses, pad).logits, query_responses, pad)
                loss = (loss_sums / num_tokens).sum() / len(examples)
            assert loss.dim() == 0
            loss.backward()
        loss_avg += loss.detach()
    return loss_avg


def rouge(prediction, reference):
    """ROUGE-1, -2 and -L F-measures 2PR / (P + R) = 2 matches / (prediction + reference units) on lowercased whitespace
    tokens (deviation: the reference uses the `rouge_score` package, which also strips punctuation)."""
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = [0] * (len(r) + 1)  # lcs[j]: longest common subsequence of the prediction so far and r[:j]
    for x in p:
        previous = lcs[:]  # the row before x
        for j, y in enumerate(r):
            lcs[j + 1] = previous[j] + 1 if x == y else max(previous[j + 1], lcs[j])
    ngrams = [(Counter(zip(*[p[i:] for i in range(n)])), Counter(zip(*[r[i:] for i in range(n)]))) for n in (1, 2)]
    matches = [sum((a & b).values()) for a, b in ngrams] + [lcs[-1]]  # an n-gram at most as often as in the reference
    units = [a.total() + b.total() for a, b in ngrams] + [len(p) + len(r)]
    return {name: 2 * m / u if m else 0.0 for name, m, u in zip(["rouge1", "rouge2", "rougeL"], matches, units)}


@torch.no_grad()
def evaluate(model, examples, split, tokenizer, args, device, rank, world_size):
    """(metrics, rows in dataset order): loss over all non-pad tokens (deviation: the reference averages batch means),
    ROUGE of generations at temperature 0.01 [D9] cut after the first EOS [D23.2]; each rank on a contiguous share."""
    pad, eos, share = tokenizer.pad_token_id, tokenizer.eos_token_id, math.ceil(len(examples) / world_size)
    loss_stats, rows = torch.zeros(2, device=device), []  # sums of token losses and of tokens
    for batch, keep in eval_chunks(examples[rank * share : (rank + 1) * share], args.local_eval_batch_size, share,
                                   examples[0]):
        query_responses = torch.tensor([right_pad(e["query"] + e["response"], args.query_length + args.response_length,
                                        pad) for e in batch], device=device)  # (B, Q + R)
        queries = torch.tensor([[pad] * (args.query_length - len(e["query"])) + e["query"] for e in batch],
                               device=device)  # (B, Q), left-padded
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            loss_sum, num_tokens = sft_loss(forward(model, query_responses, pad).logits, query_responses, pad)
            responses = generate(model, queries, pad, args.response_length, temperature=0.01)[0][:, args.query_length:]
        if keep:
            loss_stats += torch.stack([loss_sum.sum(), num_tokens.sum().float()])
            for e, response in zip(batch, responses.tolist()):
                cut = response[: response.index(eos) + 1] if eos in response else response  # to the first EOS [D23.2]
                rows.append(dict(id=e["id"], query=tokenizer.decode(e["query"], skip_special_tokens=True),
                                 response=tokenizer.decode(cut, skip_special_tokens=True), reference=e["reference"],
                                 has_eos=eos in cut, response_tokens=len(cut)))
    loss_stats, rows = gather_mean(loss_stats, world_size), gather_rows(rows, world_size)  # means: the same ratio
    loss_name, prefix = EVAL_SPLITS[split]
    scores = [rouge(r["response"], r["reference"]) | {k: r[k] for k in ("has_eos", "response_tokens")} for r in rows]
    return {loss_name: (loss_stats[0] / loss_stats[1]).item(),
            **{prefix + key: sum(s[key] for s in scores) / len(rows) for key in scores[0]}}, rows


def main(args):
    rank, world_size, device = init_distributed()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"  # CUDA matmuls; no convolutions here

    # 1. Check every argument and the dataset's columns before any model loads
    gradient_accumulation_steps = check_args(args, world_size)
    check_model_path(args.base_model, "--base-model", args.base_model_revision)
    dataset = load_data(args.query_dataset, "--query-dataset", revision=args.query_dataset_revision)
    if "train" not in dataset:
        raise ValueError(f"--query-dataset: no train split; it has {list(dataset)}")
    prompt_completion = all(c in dataset["train"].column_names for c in PROMPT_COMPLETION_COLUMNS)
    eval_splits = [s for s in EVAL_SPLITS if s in dataset] if args.run_eval else []
    for split in ["train"] + eval_splits:
        check_columns(dataset[split], PROMPT_COMPLETION_COLUMNS if prompt_completion else TLDR_COLUMNS,
                      f"--query-dataset ({split} split; TL;DR columns {TLDR_COLUMNS} or {PROMPT_COMPLETION_COLUMNS})")
    if args.run_eval and not eval_splits:
        raise ValueError(f"--run-eval: --query-dataset has neither a validation nor a test split ({list(dataset)})")
    if rank == 0 and args.run_eval and len(eval_splits) < len(EVAL_SPLITS):  # said, not silently skipped
        print(f"--query-dataset lacks {[s for s in EVAL_SPLITS if s not in eval_splits]}: evaluating {eval_splits}")

    # 2. Tokenize: query [D2.2] + " " + summary + EOS [D3]; drop longer responses (deviation: the reference cuts them)
    tokenizer = load_tokenizer(args.base_model, "--base-model", args.base_model_revision)
    data = {}
    for split in ["train"] + eval_splits:
        rows = dataset[split] if split == "train" else dataset[split].take(args.num_eval_samples or len(dataset[split]))
        rows = rows.to_list()
        examples = [dict(id=row.get("id", str(i)), **example) for i, (row, example) in
                    enumerate(zip(rows, tokenize_examples(tokenizer, rows, args.query_length, prompt_completion)))]
        data[split] = [e for e in examples if len(e["response"]) <= args.response_length]
        if not data[split]:
            raise ValueError(f"--query-dataset {args.query_dataset}: of the {len(rows)} rows of the {split!r} split "
                             f"(the split is empty if 0), none has a response within --response-length")
        if rank == 0:
            print(f"{split}: {len(data[split])} sequences; dropped {len(rows) - len(data[split])} of {len(rows)} whose "
                  f"response is longer than --response-length {args.response_length} tokens (EOS included)")
    train = data["train"]
    max_updates = args.num_train_epochs * (len(train) // args.batch_size)
    num_updates = max_updates if args.total_episodes is None else args.total_episodes // args.batch_size
    if not 1 <= num_updates <= max_updates:
        raise ValueError(f"--total-episodes {args.total_episodes} gives {num_updates} updates of {args.batch_size}; "
                         f"{len(train)} sequences x {args.num_train_epochs} epochs allow 1 to {max_updates}")

    # 3. Model, AdamW, cosine schedule to 0 without warm-up [D9]; a resumed run restores them and its random streams
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = find_checkpoint(args, output_dir, world_size)
    run_name = run_name if checkpoint is None else checkpoint["run_name"]
    seed_everything(args.seed + rank * 100003)
    logger = Logger(args, run_name, output_dir, rank, checkpoint)  # the first write into output_dir
    policy = load_policy(args.base_model, tokenizer, device, args.base_model_revision)
    if args.fsdp:  # sharded parameters, gradients and AdamW states; gradients reduce-scattered
        shard_model(policy, args.bf16 and device.type == "cuda")
        print(f"rank {rank}: FSDP holds {sum(p.to_local().numel() for p in policy.parameters())} of the "
              f"{sum(p.numel() for p in policy.parameters())} parameters", flush=True)
    model = DDP(policy) if world_size > 1 and not args.fsdp else policy  # DDP: on the device the policy is on
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # lr factor 1 at the first update, 0 after the last [D9]
        optimizer, lambda u: 0.5 * (1 + math.cos(math.pi * u / num_updates)))
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, sharded or not
    first_update = 0 if checkpoint is None else checkpoint["update"]
    if checkpoint is not None:  # the data position is the update counter (rank_batch_indices is a function of it)
        set_state_dict(policy, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizer"],
                       options=full_state)
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"], rank)
        print(f"resumed from update {first_update} of {output_dir}/checkpoints", flush=True)
        del checkpoint
    if rank == 0:
        print(f"{num_updates} updates x {args.batch_size} sequences ({world_size} processes x "
              f"{gradient_accumulation_steps} micro-batches of {args.local_micro_batch_size}); output {output_dir}")

    # 4. Train: each update's loss is the mean over its sequences of their token-mean cross-entropy [D9]
    model.train()
    start_time = time.time()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    for update in range(first_update + 1, num_updates + 1):
        indices = rank_batch_indices(len(train), args.batch_size, update - 1, rank, world_size, args.seed)
        lr = scheduler.get_last_lr()[0]
        loss = gather_mean(accumulate_gradients(model, [train[i] for i in indices], args.local_micro_batch_size,
                                                tokenizer.pad_token_id, autocast), world_size)  # over the processes
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        check_finite("train/sft/loss", loss, f"update {update}", dict(indices=torch.tensor(indices)), output_dir, rank,
                     world_size)
        episode = update * args.batch_size
        logger.log({"train/sft/loss": loss.item(), "train/sft/lr": lr, "train/episode": episode}, step=update)
        if rank == 0:
            progress("sft", update, num_updates, start_time, first_update, loss=loss.item(), lr=lr, episode=episode)
        if update == num_updates or (args.checkpoint_every and update % args.checkpoint_every == 0):
            model_state, optimizer_state = get_state_dict(policy, optimizer, options=full_state)  # gathers FSDP shards
            state = dict(model=model_state, optimizer=optimizer_state, scheduler=scheduler.state_dict(), update=update,
                         rng=rng_states(world_size), args=asdict(args), run_name=run_name, **logger.state())
            if rank == 0:  # every process took part in the gathers; rank 0 writes
                save_checkpoint(output_dir, update, state, args.keep_checkpoints)

    # 5. Save (rank 0), then evaluate: val/test loss, generations at temperature 0.01, ROUGE [D9]
    policy_state = get_model_state_dict(policy, options=full_state)  # whole tensors, also under FSDP (a collective)
    if rank == 0:
        policy.save_pretrained(output_dir, state_dict=policy_state)
        tokenizer.save_pretrained(output_dir)
    policy.eval()
    for split in eval_splits:
        metrics, rows = evaluate(policy, data[split], split, tokenizer, args, device, rank, world_size)
        logger.log(metrics, step=num_updates)
        logger.table(f"eval_{split}", rows, output_dir)
        if rank == 0:
            print(f"{split}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    if world_size > 1:  # DDP's reducer holds the group: freed first, else the group dies in it at exit (gloo can hang)
        del model
        gc.collect()
        dist.barrier()  # every process done with its collectives before any tears the group down (gloo can abort)
        dist.destroy_process_group()


# ======================================================================================================================
# PLUMBING, the same block line for line in sft.py, reward_model.py, ppo_tldr.py and dpo.py (test_common_copies.py):
# processes, input checks, logging, progress, checkpoints and resume, the NaN stop, FSDP, batches and gathering.
# Nothing of the algorithm is below this line: a reader can skip to the end of the file.
# ======================================================================================================================
def exact_div(a, b, what):
    """a / b as an int; fails loudly, naming the quantities, when b does not divide a."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def init_distributed():
    """(rank, world_size, device). A process group only under torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def check_model_path(path, arg, revision=None):
    """Fail fast on a model that cannot be found: not a folder, a revision of a local folder, or, offline
    (HF_HUB_OFFLINE=1), a hub id org/name not in the cache at `revision` (online, hub ids are left to transformers)."""
    if os.path.isdir(path) and revision is not None:
        raise ValueError(f"{arg.removesuffix('-path')}-revision {revision}: {path} is a local folder, it has no revisions")
    hub_id = path.count("/") == 1 and not path.startswith((".", "~", "/"))
    if not (os.path.isdir(path) or hub_id and (os.environ.get("HF_HUB_OFFLINE") != "1" or cached_file(path, "config.json",
            revision=revision, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False))):
        raise ValueError(f"{arg}: {path!r} is not a folder, nor (offline) a hub id org/name in the Hugging Face cache "
                         f"at revision {revision or 'main'}")


def load_data(path, arg, split=None, revision=None):
    """load_dataset(path, split, revision), failing with the argument's name when the data cannot be read."""
    if os.path.isdir(path) and revision is not None:
        raise ValueError(f"{arg}-revision {revision}: {path} is a local folder, it has no revisions")
    try:
        return load_dataset(path, split=split, revision=revision)
    except ValueError as error:  # datasets refuses a local split without rows: "... corresponds to no data!"
        problem = "a split is empty" if "corresponds to no data" in str(error) else "cannot be loaded"
        raise ValueError(f"{arg} {path}: {problem} ({error})") from error


def check_columns(dataset, columns, arg):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{arg}: the dataset lacks the column(s) {missing}; it has {dataset.column_names}")


class Logger:
    """metrics.jsonl in the output folder, and Weights & Biases under --track; rank 0 only. Resuming from `checkpoint`
    cuts metrics.jsonl back to its size at the checkpoint and continues the same wandb run."""

    def __init__(self, args, run_name, output_dir, rank, checkpoint=None):
        self.rank, self.wandb = rank, None
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "w" if checkpoint is None else "r+")
        if checkpoint is not None:  # the resumed run logs the lines after the checkpoint again
            self.file.truncate(checkpoint["metrics_bytes"])
            self.file.seek(checkpoint["metrics_bytes"])
        if args.track:
            import wandb  # lazily: only --track needs it

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                                    config=asdict(args), save_code=True, resume="allow" if checkpoint else None,
                                    id=checkpoint["wandb_id"] if checkpoint else None)

    def state(self):  # what a checkpoint needs to resume the logs
        return dict(metrics_bytes=self.file.tell(), wandb_id=self.wandb and self.wandb.id) if self.rank == 0 else {}

    def log(self, metrics, step):
        if self.rank == 0:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
            if self.wandb is not None:
                self.wandb.log(metrics, step=step)

    def table(self, name, rows, output_dir):
        """rows (a list of dicts) as {output_dir}/{name}.jsonl and, under --track, a wandb table."""
        if self.rank == 0 and rows:
            with open(os.path.join(output_dir, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            if self.wandb is not None:
                self.wandb.log({name: __import__("wandb").Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})


def progress(prefix, step, total, start_time, first_step=0, **values):
    """One progress line: step, values, steps/s and ETA (counted from `first_step`, where a resumed run started)."""
    elapsed, done = time.time() - start_time, max(step - first_step, 1)
    shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    print(f"[{prefix}] {step}/{total} | {shown} | {done / max(elapsed, 1e-9):.2f} it/s | "
          f"ETA {time.strftime('%H:%M:%S', time.gmtime(elapsed / done * (total - step)))}", flush=True)


RESUMABLE_CHANGES = {"resume", "output_dir", "track", "wandb_project_name", "wandb_entity", "run_eval",
                     "checkpoint_every", "keep_checkpoints"}  # a resumed run may change these; any other change is an error


def find_checkpoint(args, output_dir, world_size):
    """Under --resume the newest complete checkpoint (loaded lazily), else None. Refuses a fresh run over another run's
    checkpoints, and a resume with other arguments or another number of processes. Runs before any model loads."""
    root = os.path.join(output_dir, "checkpoints")
    complete = sorted(n for n in os.listdir(root) if n.startswith("step_")) if os.path.isdir(root) else []
    if not args.resume:
        if complete:
            raise ValueError(f"--output-dir {output_dir} holds the checkpoints of an earlier run ({complete[-1]}): "
                             f"pass --resume to continue it, or choose another --output-dir")
        return None
    if args.output_dir is None or not complete:
        raise ValueError("--resume needs the --output-dir of the run to continue" if args.output_dir is None else
                         f"--resume: {root} holds no complete checkpoint")
    checkpoint = torch.load(os.path.join(root, complete[-1], "state.pt"), map_location="cpu", weights_only=True,
                            mmap=True)  # no pickle; mmap: tensors are read when used, not all at once per process
    changed = [k for k, v in asdict(args).items() if k not in RESUMABLE_CHANGES and checkpoint["args"].get(k) != v]
    if changed:
        raise ValueError(f"--resume: these arguments differ from the checkpointed run's: "
                         + ", ".join(f"--{k.replace('_', '-')} {checkpoint['args'].get(k)!r} -> {getattr(args, k)!r}"
                                     for k in changed))
    if len(checkpoint["rng"]) != world_size:
        raise ValueError(f"--resume: the checkpoint was written by {len(checkpoint['rng'])} processes; this run has "
                         f"{world_size} (the random streams are per process)")
    return checkpoint


def rng_states(world_size):
    """The state of every random generator (python, numpy, torch, CUDA) of every process, in rank order, in types
    that load without pickle."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return gather_rows([dict(python=random.getstate(), numpy=(name, keys.tolist(), position, has_gauss, gauss),
                             torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)], world_size)


def set_rng_states(states, rank):
    state = states[rank]
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step, state, keep):
    """Rank 0: `state` to {output_dir}/checkpoints/step_{step:08d}/state.pt, atomically (written and synced in a tmp_
    folder, renamed once complete; a crash leaves only a tmp_ folder, removed next time). Keeps the newest `keep`."""
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    for name in [n for n in os.listdir(root) if n.startswith("tmp_")]:
        shutil.rmtree(os.path.join(root, name))
    tmp, final = os.path.join(root, f"tmp_step_{step:08d}"), os.path.join(root, f"step_{step:08d}")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)  # atomic on POSIX file systems
    directory = os.open(root, os.O_RDONLY)
    os.fsync(directory)  # the rename itself durable
    os.close(directory)
    for name in sorted(n for n in os.listdir(root) if n.startswith("step_"))[:-keep]:
        shutil.rmtree(os.path.join(root, name))
    print(f"saved checkpoint {final}", flush=True)


def check_finite(name, value, where, inspect, output_dir, rank, world_size):
    """Stop, naming the quantity and the update, when the tensor `value` holds NaN or inf on any process; first every
    process saves `inspect` (a dict) to {output_dir}/nonfinite/rank{rank}.pt. The last good checkpoint is kept."""
    bad = (~torch.isfinite(value.detach())).any().float().reshape(1)
    if world_size > 1:
        dist.all_reduce(bad)
    if bad.item() == 0:
        return
    path = os.path.join(output_dir, "nonfinite", f"rank{rank}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"quantity": name, "where": where, name: value.detach().cpu(),
                **{k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in inspect.items()}}, path)
    raise FloatingPointError(f"{name} is NaN or inf at {where}: training stopped. What it was computed from is saved "
                             f"in {os.path.dirname(path)}/; the last good checkpoint in {output_dir}/checkpoints is kept")


def shard_model(model, bf16):
    """FSDP2: each transformer block, then the whole model, sharded over the processes (so every process must run the
    same forwards). `bf16`: parameters gathered and computed in bf16, gradients reduced in fp32 into the fp32 shards."""
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    block_types = set(getattr(model, "backbone", model)._no_split_modules)  # e.g. {"GPTNeoXLayer"}
    for module in [m for m in model.modules() if type(m).__name__ in block_types] + [model]:
        fully_shard(module, mp_policy=precision)
    return model


def rank_batch_indices(num_rows, batch_size, update, rank, world_size, seed):
    """This process's rows for `update` (0-based): one shuffle shared by all processes, redone with seed + pass after
    each pass over the data [D21], each batch cut into world_size contiguous slices, the last partial batch of a pass
    dropped (the reference's 911 = 116,722 // 128 SFT updates). A function of the update: resuming continues it."""
    data_pass, i = divmod(update, num_rows // batch_size)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + data_pass))
    per_rank = exact_div(batch_size, world_size, "--batch-size over the number of processes")
    return order[i * batch_size + rank * per_rank : i * batch_size + (rank + 1) * per_rank].tolist()


def eval_chunks(share, size, longest_share, filler):
    """(chunk, keep) pairs: this process's `share` in chunks of `size`, as many as the longest share on any process
    makes (under FSDP all processes run the same forwards); past its end, chunks of one `filler`, keep False."""
    for start in range(0, longest_share, size):
        chunk = share[start : start + size]
        yield (chunk, True) if chunk else ([filler], False)


def gather_rows(rows, world_size):
    """Every process's list of rows, concatenated in rank order, on every process."""
    gathered = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part] if world_size > 1 else rows


def gather_mean(value, world_size):
    """The mean over the processes of a scalar tensor (on the compute device, as NCCL requires)."""
    value = value.detach().float().clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return value
# ================================================ END OF PLUMBING ====================================================


if __name__ == "__main__":
    main(tyro.cli(Args))
