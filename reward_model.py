# See README.md "reward_model.py" for what this script does, the N+ details it implements and its benchmark numbers.
"""Reward model training on TL;DR preference pairs, faithful to the N+ reference (Huang et al., 2024) [D10-D15].

Single GPU (hub defaults: the Pythia-1B SFT checkpoint and the OpenAI comparisons):
    python reward_model.py --sft-model-path cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr
Multi-GPU (batch_size is global: 64 = 8 GPUs x 8 pairs, no accumulation):
    torchrun --nproc-per-node 8 reward_model.py --local-micro-batch-size 8
Offline tiny world (python benchmark/offline_world.py --out-dir world --size tiny):
    python reward_model.py --sft-model-path world/base_model --label-dataset world/tldr_preference \\
        --query-dataset world/tldr_sft --query-length 128 --lr 3e-4 --batch-size 32 --local-micro-batch-size 16
"""

import contextlib
import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

from value_head import ScalarModel, get_reward


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
    sft_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
    """SFT checkpoint (hub id or local folder): its backbone and tokenizer start the reward model [D10]"""
    sft_model_revision: Optional[str] = None
    """hub branch, tag or commit of --sft-model-path (e.g. a run of the paper's release); None: main; hub ids only"""
    label_dataset: str = "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"
    """preference pairs (OpenAI columns or prompt/chosen/rejected); split "train" trains, the others are evaluated"""
    label_dataset_revision: Optional[str] = None
    """hub branch, tag or commit of --label-dataset; None: the main branch; not for a local folder"""
    query_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT data (subreddit, title, post, summary); its train split's reference summaries set the bias [D15]"""
    query_dataset_revision: Optional[str] = None
    """hub branch, tag or commit of --query-dataset; None: the main branch; not for a local folder"""
    query_length: int = 512
    """maximum query length in tokens; longer TL;DR posts are cut at a newline [D2.2]"""
    response_length: int = 169
    """maximum preference response length in tokens, EOS included; pairs with a longer response are dropped"""
    total_episodes: Optional[int] = None
    """training pairs (a random subset of the train split, one pass); None: all of them"""
    batch_size: int = 64
    """pairs per optimizer update, over all processes (independent of the number of devices)"""
    local_micro_batch_size: int = 1
    """pairs per process per forward/backward (2x sequences: chosen and rejected in one pass)"""
    local_eval_batch_size: int = 8
    """pairs per process per evaluation forward; reference summaries per forward in the normalisation"""
    num_eval_samples: Optional[int] = None
    """pairs evaluated per validation split (the first ones); None: all"""
    cnndm_query_length: int = 1919
    """query length in tokens of the CNN/DM rows (validation_cnndm; the reference's 2047 - 128), articles cut to fit"""
    num_normalization_samples: Optional[int] = None
    """reference summaries of the --query-dataset train split scored for the bias (the first ones); None: all"""
    lr: float = 3e-6
    """AdamW learning rate at the first update; decays to 0 along a cosine, no warm-up"""
    eps: float = 1e-5
    """AdamW epsilon"""
    fsdp: bool = False
    """shard parameters, gradients and AdamW states over the processes (FSDP2), not DDP: for 6.9B; needs torchrun"""


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


def left_pad(tokens, length, pad_token_id):
    return [pad_token_id] * (length - len(tokens)) + tokens


def right_pad(tokens, length, pad_token_id):
    return tokens + [pad_token_id] * (length - len(tokens))


# -------------------------------------------------------- reward-model helpers ---------------------------------
OPENAI_COLUMNS = ["info", "summaries", "choice", "batch", "split", "extra"]  # OpenAI's comparisons, as on the hub
STANDARD_COLUMNS = ["prompt", "chosen", "rejected"]  # the standard preference format


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


def preference_format(dataset, arg="--label-dataset"):
    """'openai' (raw summarize_from_feedback columns) or 'standard' (prompt/chosen/rejected strings)."""
    if all(c in dataset.column_names for c in STANDARD_COLUMNS):
        return "standard"
    check_columns(dataset, OPENAI_COLUMNS, f"{arg} (or the standard format: columns {STANDARD_COLUMNS})")
    return "openai"


def tokenize_article(tokenizer, article, query_length):
    """Query tokens of a CNN/DM row (validation_cnndm: `info` has an article and no post), as the reference builds
    them: the format "Article:\n{article}\n\nTL;DR:\n"; while it exceeds `query_length` (--cnndm-query-length, 1919)
    tokens, the article is cut at its last newline (or loses its last character when it has none) and re-tokenised,
    like a post [D2.2]. Returned without the trailing newline: the reference's sequences are `query.strip() +
    response`, so its models never read that newline."""
    text = f"Article:\n{article}\n\nTL;DR:\n"
    while len(tokenizer.encode(text)) > query_length:
        if not article:
            raise ValueError(f"--cnndm-query-length {query_length} is too short to hold the CNN/DM query format even "
                             f"with an empty article")
        cut = article.rfind("\n")
        article = article[:cut] if cut != -1 else article[:-1]
        text = f"Article:\n{article}\n\nTL;DR:\n"
    return tokenizer.encode(text.strip())


def tokenize_pairs(tokenizer, dataset, fmt, query_length, response_length, cnndm_query_length):
    """(pairs, dropped): per pair the token ids of query + chosen and of query + rejected, each response + EOS [D12]; a
    pair with a response over `response_length` tokens is dropped and counted (deviation: the reference truncates it,
    cutting off the EOS the reward is read at)."""
    rows, eos = dataset.to_list(), [tokenizer.eos_token_id]
    if fmt == "openai":  # validation_cnndm rows have an article and no post
        cnndm = [row["info"].get("post") is None and row["info"].get("article") is not None for row in rows]
        posts = iter(tokenize_queries(tokenizer, [r["info"] for r, c in zip(rows, cnndm) if not c], query_length))
        queries = [tokenize_article(tokenizer, r["info"]["article"], cnndm_query_length) if c else next(posts)
                   for r, c in zip(rows, cnndm)]  # [D2.2]
        texts = [[row["summaries"][c]["text"] for c in (row["choice"], 1 - row["choice"])] for row in rows]  # " text"
    else:
        queries = tokenizer([row["prompt"] for row in rows])["input_ids"]
        texts = [[row["chosen"], row["rejected"]] for row in rows]
    responses = iter(tokenizer([text for pair in texts for text in pair])["input_ids"])  # chosen, rejected, chosen, ...
    pairs = []
    for index, (row, query_tokens, (chosen, rejected)) in enumerate(zip(rows, queries, texts)):
        if fmt == "openai":
            meta = dict(id=row["info"]["id"], split=row["split"], batch=row["batch"],
                        confidence=(row["extra"] or {}).get("confidence"))
        else:
            if len(query_tokens) > query_length:
                raise ValueError(f"--query-length {query_length}: prompt {index} of the label dataset has "
                                 f"{len(query_tokens)} tokens (prompts of the prompt/chosen/rejected format are not cut)")
            meta = dict(id=row.get("id", index), split=None, batch=None, confidence=None)
        chosen_tokens, rejected_tokens = next(responses) + eos, next(responses) + eos
        if max(len(chosen_tokens), len(rejected_tokens)) <= response_length:  # else dropped
            pairs.append(dict(index=index, query=tokenizer.decode(query_tokens), chosen=chosen, rejected=rejected,
                              query_chosen=query_tokens + chosen_tokens, query_rejected=query_tokens + rejected_tokens,
                              **meta))
    return pairs, len(dataset) - len(pairs)


def pair_batch(pairs, length, pad_token_id):
    """(2B, length) token ids: the B chosen sequences then the B rejected ones, right-padded, for one forward."""
    sequences = [p["query_chosen"] for p in pairs] + [p["query_rejected"] for p in pairs]
    return torch.tensor([right_pad(s, length, pad_token_id) for s in sequences])


def pair_rewards(model, pairs, pad_token_id, device):
    """(chosen rewards (B,), rejected rewards (B,)) in one forward, read at the EOS [D12]. Right-padded to the longest
    sequence, not to query_length + response_length: under causal attention trailing pad columns change no output."""
    longest = max(len(s) for p in pairs for s in (p["query_chosen"], p["query_rejected"]))
    query_responses = pair_batch(pairs, longest, pad_token_id).to(device)  # (2B, T)
    return get_reward(model, query_responses, pad_token_id, context_length=0)[1].float().chunk(2)


def pairwise_loss_and_accuracy(chosen_rewards, rejected_rewards):
    """Means over the pairs of the Bradley-Terry loss (Stiennon et al. 2020, eq. 1) and of r_chosen > r_rejected."""
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, (chosen_rewards > rejected_rewards).float().mean()  # a tie counts 0, as in the reference


def cosine_to_zero(num_updates):
    """Multiplier of the lr before update u (0-based): a cosine from 1 down to 0, no warm-up."""
    return lambda u: 0.5 * (1.0 + math.cos(math.pi * u / num_updates))


def eval_metrics(rows, split):
    """Accuracy (a tie counts 0) overall and by the pairs' split, batch and labeller confidence; reward means."""
    correct = [float(r["reward_chosen"] > r["reward_rejected"]) for r in rows]
    metrics = {f"eval/{split}/accuracy": sum(correct) / len(rows),
               f"eval/{split}/reward_chosen": sum(r["reward_chosen"] for r in rows) / len(rows),
               f"eval/{split}/reward_rejected": sum(r["reward_rejected"] for r in rows) / len(rows)}
    for key in ["split", "batch", "confidence"]:  # None (the prompt/chosen/rejected format): no breakdown
        for value in sorted({row[key] for row in rows if row[key] is not None}, key=str):
            group = [c for row, c in zip(rows, correct) if row[key] == value]
            metrics[f"eval/{split}/accuracy/{key}/{value}"] = sum(group) / len(group)
    return metrics


def normalization_stats(scores):
    """(bias, stats): the mean score becomes the bias [D15]; stats of the scores minus the bias."""
    scores = torch.tensor(scores, dtype=torch.float64)
    bias = scores.mean().item()
    normalized = scores - bias
    std = normalized.std().item() if len(normalized) > 1 else 0.0
    stats = dict(mean=normalized.mean().item(), std=std, min=normalized.min().item(), max=normalized.max().item())
    return bias, stats


def reference_summaries(rows, tokenizer, query_length, response_length):
    """(queries, responses, dropped): the TL;DR queries [D2.2] and reference summaries " {summary}" + EOS [D3] that
    set the normalisation bias [D15]; a summary over `response_length` tokens (EOS included) is dropped and counted."""
    rows = list(rows)  # (a dataset's rows as dicts)
    summaries = tokenizer([" " + row["summary"] for row in rows])["input_ids"]  # leading space [D3]
    responses = [summary + [tokenizer.eos_token_id] for summary in summaries]  # + EOS [D3]
    kept = [i for i, response in enumerate(responses) if len(response) <= response_length]
    queries = tokenize_queries(tokenizer, [rows[i] for i in kept], query_length)  # [D2.2]
    return queries, [responses[i] for i in kept], len(rows) - len(kept)


def main(args):
    rank, world_size, device = init_distributed()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"  # CUDA matmuls; no convolutions here

    # 1. Check every argument and dataset before any model loads
    gradient_accumulation_steps = check_args(args, world_size)
    check_model_path(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    tokenizer = load_tokenizer(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    pad_token_id = tokenizer.pad_token_id
    label_splits = load_data(args.label_dataset, "--label-dataset", revision=args.label_dataset_revision)
    if "train" not in label_splits:
        raise ValueError(f"--label-dataset {args.label_dataset}: no train split (it has {list(label_splits)})")
    eval_splits = [split for split in label_splits if split != "train"] if args.run_eval else []
    query_rows = load_data(args.query_dataset, "--query-dataset", "train", args.query_dataset_revision)
    check_columns(query_rows, ["subreddit", "title", "post", "summary"], f"--query-dataset {args.query_dataset}")

    # 2. Tokenize the pairs, right-padded at batching [D12], and the reference summaries that set the bias [D15]
    pairs = {}
    for split in ["train"] + eval_splits:
        if len(label_splits[split]) == 0:
            raise ValueError(f"--label-dataset {args.label_dataset}: the {split!r} split is empty")
        fmt = preference_format(label_splits[split], f"--label-dataset {args.label_dataset} (split {split})")
        pairs[split], dropped = tokenize_pairs(tokenizer, label_splits[split], fmt, args.query_length,
                                               args.response_length, args.cnndm_query_length)
        if rank == 0:
            print(f"{split}: {len(pairs[split])} pairs ({fmt} format), {dropped} dropped (over --response-length)")
    train = pairs["train"]
    num_train_pairs = len(train) if args.total_episodes is None else args.total_episodes
    num_updates = num_train_pairs // args.batch_size
    if num_train_pairs > len(train) or num_updates == 0:
        raise ValueError(f"--total-episodes {args.total_episodes}, --batch-size {args.batch_size}: {len(train)} usable "
                         f"train pairs allow 1 to {len(train) // args.batch_size} updates, one pass")
    if num_train_pairs % args.batch_size and rank == 0:
        print(f"{num_train_pairs % args.batch_size} training pairs left out: not a full batch of {args.batch_size}")
    norm_queries, norm_responses, norm_dropped = reference_summaries(query_rows.take(
        args.num_normalization_samples or len(query_rows)), tokenizer, args.query_length, args.response_length)
    if not norm_queries:
        raise ValueError(f"--query-dataset {args.query_dataset}: no reference summary fits --response-length")
    if rank == 0:
        print(f"{len(norm_queries)} reference summaries set the bias, {norm_dropped} dropped (over --response-length)")

    # 3. Model: the SFT backbone + a fresh scalar head [D10, D11], no dropout [D7]; AdamW (decay 0.01, no clipping)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = find_checkpoint(args, output_dir, world_size)
    run_name = run_name if checkpoint is None else checkpoint["run_name"]
    seed_everything(args.seed + rank * 100003)
    logger = Logger(args, run_name, output_dir, rank, checkpoint)  # the first write into output_dir
    config = config_without_dropout(args.sft_model_path, args.sft_model_revision)  # fp32, no resize: [PAD] ids -> 0
    model = ScalarModel.from_backbone(args.sft_model_path, revision=args.sft_model_revision, config=config).to(device)
    if args.fsdp:  # every process drew its own head: take rank 0's (DDP does that itself), then shard
        for tensor in model.scalar_head.state_dict().values():  # the backbone is the same SFT checkpoint everywhere
            dist.broadcast(tensor, src=0)
        shard_model(model, args.bf16 and device.type == "cuda")
        print(f"rank {rank}: FSDP holds {sum(p.to_local().numel() for p in model.parameters())} of the "
              f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    ddp_model = DDP(model) if world_size > 1 and not args.fsdp else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_to_zero(num_updates))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, sharded or not
    first_update = 0 if checkpoint is None else checkpoint["update"]
    if checkpoint is not None:  # the data position is the update counter (rank_batch_indices is a function of it)
        set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizer"],
                       options=full_state)
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"], rank)
        print(f"resumed from update {first_update} of {output_dir}/checkpoints", flush=True)
        del checkpoint
    batches = [rank_batch_indices(len(train), args.batch_size, u, rank, world_size, args.seed)
               for u in range(num_updates)]  # one pass; one shuffle for all processes, cut into disjoint slices
    all_indices = gather_rows([i for batch in batches for i in batch], world_size)
    assert len(set(all_indices)) == len(all_indices) == num_updates * args.batch_size, "the processes' pairs overlap"
    print(f"[rank {rank}/{world_size}] trains on {len(all_indices) // world_size} pairs (first indices "
          f"{batches[0][:4]}); the {world_size} shards are disjoint and cover {len(all_indices)} pairs", flush=True)

    # 4. Train: Bradley-Terry updates, chosen and rejected in one forward [D12]
    start_time = time.time()
    ddp_model.train()
    for update, batch in enumerate(batches[first_update:], start=first_update + 1):
        sums = torch.zeros(4, device=device)  # loss, accuracy, chosen and rejected rewards: sums of micro-batch means
        for start in range(0, len(batch), args.local_micro_batch_size):
            last = start + args.local_micro_batch_size == len(batch)
            if args.fsdp:  # gradients reduced on the last micro-batch only (DDP: no_sync before it)
                model.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if last or world_size == 1 or args.fsdp else ddp_model.no_sync():
                micro = [train[i] for i in batch[start : start + args.local_micro_batch_size]]
                with torch.autocast(**autocast):
                    chosen_rewards, rejected_rewards = pair_rewards(ddp_model, micro, pad_token_id, device)  # (b,) each
                loss, accuracy = pairwise_loss_and_accuracy(chosen_rewards, rejected_rewards)  # Bradley-Terry
                assert loss.dim() == 0
                (loss / gradient_accumulation_steps).backward()
            sums += torch.stack([loss, accuracy, chosen_rewards.mean(), rejected_rewards.mean()]).detach()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        means = gather_mean(sums / gradient_accumulation_steps, world_size)
        check_finite("train/rm/loss", means[0], f"update {update}", dict(pair_indices=torch.tensor(batch)), output_dir,
                     rank, world_size)
        loss, accuracy, chosen_reward, rejected_reward = means.tolist()
        logger.log({"train/rm/loss": loss, "train/rm/accuracy": accuracy, "train/rm/chosen_rewards": chosen_reward,
                    "train/rm/rejected_rewards": rejected_reward, "train/rm/lr": lr,
                    "train/episode": update * args.batch_size}, step=update)
        if rank == 0:
            progress("reward_model", update, num_updates, start_time, first_update, loss=loss, accuracy=accuracy, lr=lr)
        if update == num_updates or (args.checkpoint_every and update % args.checkpoint_every == 0):
            states = rng_states(world_size)  # every process takes part; rank 0 writes
            model_state, optimizer_state = get_state_dict(model, optimizer, options=full_state)  # gathers FSDP shards
            if rank == 0:
                save_checkpoint(output_dir, update, dict(
                    model=model_state, optimizer=optimizer_state, scheduler=scheduler.state_dict(), update=update,
                    rng=states, args=asdict(args), run_name=run_name, **logger.state()), args.keep_checkpoints)

    # 5. Normalise [D15]: the reference summaries' mean score becomes the bias; left- vs right-padding check [D14]
    model.eval()
    torch.set_grad_enabled(False)  # evaluation only from here on
    norm_scores, padding_diffs = [], []
    references = list(zip(norm_queries, norm_responses))
    for chunk, keep in eval_chunks(references[rank::world_size], args.local_eval_batch_size,
                                   math.ceil(len(references) / world_size), references[0]):
        right = torch.tensor([right_pad(q + r, args.query_length + args.response_length, pad_token_id)
                              for q, r in chunk], device=device)  # (B, Q + R)
        left = torch.tensor([left_pad(q, args.query_length, pad_token_id)  # as ppo_tldr.py pads them; (B, Q + R)
                             + right_pad(r, args.response_length, pad_token_id) for q, r in chunk], device=device)
        with torch.autocast(**autocast):
            scores = get_reward(model, right, pad_token_id, context_length=0)[1].float()
            left_scores = get_reward(model, left, pad_token_id, context_length=args.query_length)[1].float()
        if keep:
            norm_scores += scores.tolist()
            padding_diffs.append((scores - left_scores).abs().max().item())
    bias, stats = normalization_stats(gather_rows(norm_scores, world_size))
    model.bias = bias  # every output now has the bias subtracted: reference summaries score 0 on average [D15]
    padding_diff = max(gather_rows(padding_diffs, world_size))
    logger.log({"normalization/bias": bias, **{f"normalization/{k}": v for k, v in stats.items()},
                "eval/left_right_padding_diff": padding_diff}, step=num_updates)
    model_state = get_model_state_dict(model, options=full_state)  # whole tensors, also under FSDP (a collective)
    if rank == 0:
        print(f"normalisation: bias {bias:.4g}, then mean {stats['mean']:.3g} std {stats['std']:.4g} min "
              f"{stats['min']:.4g} max {stats['max']:.4g}; left- vs right-padding max |diff| {padding_diff:.3g}")
        model.save_pretrained(output_dir, state_dict=model_state)  # value_head format, read by ppo_tldr.py
        tokenizer.save_pretrained(output_dir)

    # 6. Evaluate the validation splits that kept pairs (deviation: the reference evaluates before normalising)
    for split in [s for s in eval_splits if pairs[s]]:
        split_pairs, rows = pairs[split][: args.num_eval_samples], []
        for batch, keep in eval_chunks(split_pairs[rank::world_size], args.local_eval_batch_size,
                                       math.ceil(len(split_pairs) / world_size), split_pairs[0]):
            with torch.autocast(**autocast):
                chosen_rewards, rejected_rewards = pair_rewards(model, batch, pad_token_id, device)
            rows += [dict({k: v for k, v in p.items() if "query_" not in k}, reward_chosen=c, reward_rejected=r)
                     for p, c, r in zip(batch, chosen_rewards.tolist(), rejected_rewards.tolist()) if keep]
        rows = sorted(gather_rows(rows, world_size), key=lambda r: r["index"])  # a row per pair, no token ids
        metrics = eval_metrics(rows, split)
        logger.log(metrics, step=num_updates)
        logger.table(f"eval_{split}", [{k: v for k, v in r.items() if k != "index"} for r in rows], output_dir)
        if rank == 0:
            print(f"eval {split}: accuracy {metrics[f'eval/{split}/accuracy']:.4f} over {len(rows)} pairs")

    if world_size > 1:  # DDP's reducer holds the group: freed first, else the group dies in it at exit (gloo can hang)
        del ddp_model
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
