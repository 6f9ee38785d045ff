# See README.md "dpo.py" for what this script does, the N+ details it implements and its benchmark numbers.
"""Direct preference optimisation (DPO, Rafailov et al. 2023) of the TL;DR SFT policy on the OpenAI preferences.

Single GPU, hub defaults (Pythia-1B SFT policy, the summarize_from_feedback comparisons):
    python dpo.py --output-dir runs/dpo_1b

Multi-GPU (the global --batch-size 64 is split over the processes; 8 x 8 pairs per update here):
    torchrun --nproc-per-node 8 dpo.py --local-micro-batch-size 8 --output-dir runs/dpo_1b

Offline tiny world (CPU, seconds; build it first with benchmark/offline_world.py):
    python benchmark/offline_world.py --out-dir world --size tiny
    python dpo.py --sft-model-path world/base_model --query-dataset world/tldr_sft \
        --label-dataset world/tldr_preference --query-length 128 --lr 3e-4 --beta 0.1 \
        --batch-size 32 --local-micro-batch-size 16 --num-eval-samples 16 --output-dir runs/dpo_tiny
"""

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

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
    """bf16 autocast on CUDA, weights and log-softmax in fp32 (deviation: the reference trains in bf16 under
    DeepSpeed); runs on CPU are always fp32"""
    tf32: bool = False
    """TF32 matrix products on CUDA (faster fp32 matmuls with a 10-bit mantissa: they change the numbers); off: full
    fp32. No effect on CPU"""
    resume: bool = False
    """continue the run in --output-dir from its newest complete checkpoint (same arguments; the result is the same
    as an uninterrupted run's)"""
    checkpoint_every: int = 100
    """write a checkpoint (models, optimizer, schedule, random states, position) every this many updates (PPO: PPO
    updates of --batch-size episodes; the others: optimizer updates), and at the end; 0 = at the end only"""
    keep_checkpoints: int = 1
    """checkpoints kept in {output_dir}/checkpoints (the newest ones)"""
    # ---- end of the common block; then the script's model/data paths, lengths, batch sizes, optimiser, algorithm ----
    sft_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
    """SFT checkpoint (hub id or folder): initialises the policy and the frozen reference; its tokenizer is used"""
    sft_model_revision: Optional[str] = None
    """branch, tag or commit of --sft-model-path on the hub (e.g. a run of the paper's release); None: the main
    branch. Only for a hub id (a local folder has none)"""
    label_dataset: str = "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"
    """preference pairs (hub id or folder): raw OpenAI columns (info, summaries, choice, batch, split, extra) or the
    standard prompt/chosen/rejected strings; split "train" trains, every other split is evaluated"""
    label_dataset_revision: Optional[str] = None
    """branch, tag or commit of --label-dataset on the hub; None: the main branch. Only for a hub id (a local
    folder has none)"""
    query_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT set (hub id or folder; columns id, subreddit, title, post, summary): its validation posts are the
    prompts of the generation evaluation, its summaries the references"""
    query_dataset_revision: Optional[str] = None
    """branch, tag or commit of --query-dataset on the hub; None: the main branch. Only for a hub id (a local
    folder has none)"""
    query_length: int = 512
    """maximum query length in tokens; longer posts are cut at their last newline [D2.2]"""
    response_length: int = 169
    """maximum preference response length in tokens, EOS included; pairs with a longer response are dropped [D5]"""
    eval_response_length: int = 128
    """tokens generated per post in the generation evaluation (cut after the first EOS)"""
    total_episodes: Optional[int] = None
    """number of training pairs to use (the first ones of the shuffle); None = one epoch over all kept pairs"""
    batch_size: int = 64
    """preference pairs per optimizer update, over all processes"""
    local_micro_batch_size: int = 1
    """preference pairs per forward/backward per process (each pair is two sequences: chosen and rejected)"""
    local_eval_batch_size: int = 8
    """pairs (preference evaluation) or posts (generation) per forward per process in the evaluation"""
    lr: float = 3e-6
    """AdamW learning rate at the first update; cosine decay to 0 over the updates, no warm-up"""
    eps: float = 1e-5
    """AdamW epsilon"""
    beta: float = 0.05
    """DPO inverse temperature beta (dimensionless): strength of the implicit KL penalty to the reference"""
    loss_type: Literal["sigmoid", "ipo", "label_smoothing"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023, eq. 7); ipo: IPO (Azar et al. 2023, eq. 17); label_smoothing:
    conservative DPO (Mitchell 2023) with --label-smoothing as the assumed label-flip probability"""
    label_smoothing: float = 0.0
    """label-flip probability in (0, 0.5); read only by --loss-type label_smoothing (non-zero otherwise: an error)"""
    precompute_ref_logprobs: bool = False
    """compute the reference's sequence log-probs once before training and free the reference (saves memory and
    one forward per micro-batch); False computes them on the fly"""
    fsdp: bool = False
    """shard the policy's parameters, gradients and AdamW states, and the reference's parameters, over the processes
    with PyTorch FSDP2 `fully_shard` instead of replicating them with DDP: for the 6.9B run (see README.md "Multi-GPU
    and memory"); needs torchrun"""
    num_eval_samples: Optional[int] = None
    """number of SFT validation posts (the first ones) generated for in the evaluation; None = the whole split"""
    cnndm_query_length: int = 1919
    """query length in tokens of the CNN/DM rows (validation_cnndm), whose articles are cut at their last newline to
    fit, as the reference (2047 - 128); --query-length applies to the TL;DR posts"""


# -------------------------------------------------------- helpers (copied verbatim from the common code) ---------


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


def tokenize_query(tokenizer, info, query_length):
    """Token ids of the formatted query; while too long, cut the post at its last newline (or drop its last
    character if it has none) and re-tokenise [D2.2]. Not padded."""
    info = dict(info)
    tokens = tokenizer.encode(format_query(info))
    while len(tokens) > query_length:
        if not info["post"]:
            raise ValueError(f"--query-length {query_length} is too short to hold the query format even with an "
                             f"empty post (title {info['title']!r} needs {len(tokens)} tokens)")
        cut = info["post"].rfind("\n")
        info["post"] = info["post"][:cut] if cut != -1 else info["post"][:-1]
        tokens = tokenizer.encode(format_query(info))
    return tokens


def left_pad(tokens, length, pad_token_id):
    return [pad_token_id] * (length - len(tokens)) + tokens


def right_pad(tokens, length, pad_token_id):
    return tokens + [pad_token_id] * (length - len(tokens))


def first_true_indices(bools, dtype=torch.long):
    """Index of the first True in each row of a (B, T) bool tensor; T where a row has none."""
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def truncate_response(stop_token_id, pad_token_id, responses):
    """Everything after the first EOS becomes pad; the EOS itself is kept [D23.2]."""
    trunc_idxs = first_true_indices(responses == stop_token_id).unsqueeze(-1)  # (B, 1)
    idxs = torch.arange(responses.size(1), device=responses.device).view(1, -1)  # (1, T)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


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


# -------------------------------------------------------- DPO helpers --------------------------------------------
OPENAI_COLUMNS = ["info", "summaries", "choice", "batch", "split", "extra"]
STANDARD_COLUMNS = ["prompt", "chosen", "rejected"]
SFT_COLUMNS = ["id", "subreddit", "title", "post", "summary"]


def validate_args(args, world_size):
    """Fail on a bad argument before any data or model is loaded, naming the argument; returns the number of
    gradient-accumulation steps, batch_size / (local_micro_batch_size * world_size)."""
    for name in ["query_length", "response_length", "eval_response_length", "batch_size", "local_micro_batch_size",
                 "local_eval_batch_size", "cnndm_query_length"]:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.loss_type == "label_smoothing" and not 0 < args.label_smoothing < 0.5:
        raise ValueError(f"--loss-type label_smoothing needs --label-smoothing in (0, 0.5), got {args.label_smoothing}")
    if args.loss_type != "label_smoothing" and args.label_smoothing != 0:
        raise ValueError(f"--label-smoothing {args.label_smoothing} is read only by --loss-type label_smoothing; "
                         f"with --loss-type {args.loss_type} it would be ignored")
    if args.total_episodes is not None and args.total_episodes < args.batch_size:
        raise ValueError(f"--total-episodes {args.total_episodes} is smaller than one --batch-size {args.batch_size}")
    if args.num_eval_samples is not None and args.num_eval_samples <= 0:
        raise ValueError(f"--num-eval-samples must be positive or None, got {args.num_eval_samples}")
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise ValueError(f"--checkpoint-every must be >= 0 and --keep-checkpoints >= 1, got {args.checkpoint_every} "
                         f"and {args.keep_checkpoints}")
    if args.fsdp and world_size == 1:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N (N > 1)")
    check_model_path(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    for arg, path in [("--label-dataset", args.label_dataset), ("--query-dataset", args.query_dataset)]:
        if path.startswith(("/", ".")) and not os.path.exists(path):
            raise ValueError(f"{arg} {path}: no such file or folder")
    return exact_div(args.batch_size, args.local_micro_batch_size * world_size,
                     "--batch-size over --local-micro-batch-size x number of processes")


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


def tokenize_pair(tokenizer, row, query_length, data_format, fallback_id, cnndm_query_length):
    """Token ids and texts of one preference pair. A response is its text's tokens + EOS [D5] (OpenAI texts already
    begin with a space); the query is the TL;DR format cut to query_length [D2.2] (a CNN/DM row: the article
    format cut to cnndm_query_length), or the standard format's prompt as is (possibly too long: the caller drops it). `fallback_id` is the
    id of a standard-format row without an id column."""
    if data_format == "openai":
        info = row["info"]
        if info.get("post") is None and info.get("article") is not None:
            query_token = tokenize_article(tokenizer, info["article"], cnndm_query_length)
        else:
            query_token = tokenize_query(tokenizer, info, query_length)  # [D2.2]
        chosen, rejected = row["summaries"][row["choice"]]["text"], row["summaries"][1 - row["choice"]]["text"]
        extra = row["extra"] or {}
        meta = dict(id=row["info"]["id"], split=row["split"], batch=row["batch"], confidence=extra.get("confidence"))
    else:
        query_token = tokenizer.encode(row["prompt"])
        chosen, rejected = row["chosen"], row["rejected"]
        meta = dict(id=str(row["id"]) if "id" in row else fallback_id, split=None, batch=None, confidence=None)
    eos = [tokenizer.eos_token_id]
    return dict(query_token=query_token,
                chosen_token=tokenizer.encode(chosen, add_special_tokens=False) + eos,
                rejected_token=tokenizer.encode(rejected, add_special_tokens=False) + eos,
                query=tokenizer.decode(query_token), chosen=chosen, rejected=rejected, **meta)


def build_sequences(query_tokens, response_tokens, length, pad_token_id):
    """Query + response right-padded to `length` (B, T), and each query's length (B,) for the response mask."""
    rows = [right_pad(q + r, length, pad_token_id) for q, r in zip(query_tokens, response_tokens)]
    assert all(len(row) == length for row in rows), f"a query + response exceeds {length} tokens"
    return torch.tensor(rows), torch.tensor([len(q) for q in query_tokens])


def response_mask(query_responses, query_lengths, pad_token_id):
    """(B, T) bool: True on response tokens including the EOS, False on the query and on the right padding."""
    positions = torch.arange(query_responses.size(1), device=query_responses.device).unsqueeze(0)  # (1, T)
    return (positions >= query_lengths.unsqueeze(1)) & (query_responses != pad_token_id)


def sequence_logprobs(logits, query_responses, mask):
    """Sum over the masked tokens of log pi(token | prefix) (B,): the logits at t predict the token at t + 1."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    token_logprobs = torch.gather(logprobs, 2, query_responses[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_logprobs * mask[:, 1:]).sum(1)  # (B,)


def concatenated_logprobs(model, chosen, rejected, query_lengths, pad_token_id):
    """Sequence log-probs of chosen and rejected (B,), (B,) from one forward pass over the 2B sequences."""
    query_responses = torch.cat([chosen, rejected])  # (2B, T)
    mask = response_mask(query_responses, query_lengths.repeat(2), pad_token_id)  # (2B, T)
    logps = sequence_logprobs(forward(model, query_responses, pad_token_id).logits, query_responses, mask)  # (2B,)
    return logps[: chosen.size(0)], logps[chosen.size(0):]


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    """Loss averaged over the batch (the reference forgot the mean) and the implicit rewards beta * (pi - ref)."""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)  # (B,) the reference's `logits`
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)  # DPO, Rafailov et al. 2023, eq. 7
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO, Azar et al. 2023, eq. 17 (tau = beta)
    elif loss_type == "label_smoothing":  # conservative DPO, Mitchell 2023: labels flipped with prob label_smoothing
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        raise ValueError(f"--loss-type must be sigmoid, ipo or label_smoothing, got {loss_type!r}")
    loss = losses.mean()
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()  # (B,)
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()  # (B,)
    return loss, chosen_rewards, rejected_rewards


def preference_accuracy(chosen_rewards, rejected_rewards):
    """Per pair: 1 if the chosen response has the higher implicit reward, 0 if lower, 0.5 on an exact tie (deviation:
    the reference counts ties as 0, which reads 0 instead of chance when the policy equals the reference)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def rank_batches(perm, batch_size, rank, world_size):
    """This process's slice of every global batch: the shared permutation is cut into batches of batch_size pairs
    (a last incomplete batch is left out), each split into world_size disjoint contiguous slices."""
    local = exact_div(batch_size, world_size, "--batch-size over the number of processes")
    return [perm[start + rank * local: start + (rank + 1) * local].tolist()
            for start in range(0, len(perm) - batch_size + 1, batch_size)]


def chunks(items, size):
    return [items[i: i + size] for i in range(0, len(items), size)]


def accuracy_breakdown(rows, prefix):
    """Accuracy overall and per labelling split, batch and labeller confidence, as reward_model.py reports it."""
    metrics = {f"{prefix}/accuracy": sum(r["accuracy"] for r in rows) / len(rows),
               f"{prefix}/reward_margin": sum(r["reward_chosen"] - r["reward_rejected"] for r in rows) / len(rows)}
    for key in ["split", "batch", "confidence"]:
        for value in sorted({r[key] for r in rows if r[key] is not None}, key=str):
            group = [r["accuracy"] for r in rows if r[key] == value]
            metrics[f"{prefix}/accuracy/{key}/{value}"] = sum(group) / len(group)
    return metrics


def main(args):
    rank, world_size, device = init_distributed()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"  # CUDA matmuls; no convolutions here
    grad_accum = validate_args(args, world_size)
    label_datasets = load_data(args.label_dataset, "--label-dataset", revision=args.label_dataset_revision)
    if "train" not in label_datasets:
        raise ValueError(f"--label-dataset {args.label_dataset}: no 'train' split (has {list(label_datasets)})")
    data_format = preference_format(label_datasets["train"])
    if args.run_eval:
        query_dataset = load_data(args.query_dataset, "--query-dataset", "validation", args.query_dataset_revision)
        check_columns(query_dataset, SFT_COLUMNS, "--query-dataset")
        if args.num_eval_samples is not None:
            if args.num_eval_samples > len(query_dataset) and rank == 0:
                print(f"--num-eval-samples {args.num_eval_samples}: the validation split has only "
                      f"{len(query_dataset)} posts; generating for all of them", flush=True)
            query_dataset = query_dataset.select(range(min(args.num_eval_samples, len(query_dataset))))
    tokenizer = load_tokenizer(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    sequence_length = max(args.query_length, args.cnndm_query_length) + args.response_length  # the longest [D5]

    def prepare(split):
        """Tokenised pairs of one split; pairs with a response over response_length (or a standard-format prompt
        over query_length) are dropped and counted (deviation: the reference's preprocessing truncates a response,
        cutting off its EOS)."""
        dataset = label_datasets[split]
        if len(dataset) == 0:
            raise ValueError(f"--label-dataset {args.label_dataset}: the {split!r} split is empty")
        tokenized = dataset.map(
            lambda row, i: tokenize_pair(tokenizer, row, args.query_length, data_format, f"{split}-{i}",
                                         args.cnndm_query_length),
            with_indices=True, remove_columns=dataset.column_names, keep_in_memory=True)
        kept = tokenized.filter(lambda r: (data_format == "openai" or len(r["query_token"]) <= args.query_length)
                                and max(len(r["chosen_token"]), len(r["rejected_token"])) <= args.response_length,
                                keep_in_memory=True)
        if rank == 0:
            print(f"--label-dataset split {split}: kept {len(kept)} of {len(dataset)} pairs "
                  f"({len(dataset) - len(kept)} dropped: a response over --response-length {args.response_length} "
                  f"tokens incl. EOS or a query over --query-length {args.query_length})", flush=True)
        return kept

    train_dataset = prepare("train")
    eval_splits = {split: prepare(split) for split in label_datasets if split != "train"} if args.run_eval else {}
    num_pairs = len(train_dataset) if args.total_episodes is None else args.total_episodes
    if num_pairs > len(train_dataset):
        raise ValueError(f"--total-episodes {args.total_episodes} exceeds the {len(train_dataset)} training pairs kept")
    num_updates = num_pairs // args.batch_size
    if num_updates == 0:
        raise ValueError(f"{len(train_dataset)} training pairs do not fill one --batch-size {args.batch_size}")

    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = find_checkpoint(args, output_dir, world_size)
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    seed_everything(args.seed + rank * 100003)
    logger = Logger(args, run_name, output_dir, rank, checkpoint)  # the first write into output_dir
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")

    # One shuffle shared by all processes, cut into disjoint per-rank slices (the reference's DataLoader shuffle,
    # synchronised across processes by accelerate, does the same); the first num_pairs pairs of it train, one epoch.
    perm = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(args.seed))[:num_pairs]
    local_batches = rank_batches(perm, args.batch_size, rank, world_size)  # num_updates x (batch_size / world_size)
    local_indices = [i for batch in local_batches for i in batch]
    print(f"[rank {rank}] trains on {len(local_indices)} pairs in {num_updates} updates "
          f"({num_pairs - num_updates * args.batch_size} pairs left over); first pair indices {local_indices[:8]}",
          flush=True)

    def collate(dataset, indices):
        """chosen, rejected (B, T) and the query lengths (B,) of the pairs at `indices`. Right-padded to the longest
        query + response of the micro-batch (at most query_length + response_length): under causal attention the
        trailing all-pad columns change nothing and only cost time."""
        rows = dataset[indices]
        length = max(len(q) + max(len(c), len(r)) for q, c, r in
                     zip(rows["query_token"], rows["chosen_token"], rows["rejected_token"]))
        assert length <= sequence_length, (length, sequence_length)
        chosen, query_lengths = build_sequences(rows["query_token"], rows["chosen_token"], length, pad_token_id)
        rejected, _ = build_sequences(rows["query_token"], rows["rejected_token"], length, pad_token_id)
        return chosen.to(device), rejected.to(device), query_lengths.to(device), rows

    def eval_shard(dataset):
        """This process's contiguous shard of an evaluation set's indices."""
        return torch.arange(len(dataset)).tensor_split(world_size)[rank].tolist()

    def eval_longest(dataset):
        """The largest shard's length (tensor_split's first shards are the longer ones)."""
        return math.ceil(len(dataset) / world_size)

    # Policy and frozen reference, both from the SFT checkpoint, dropout off [D7].
    policy = load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision)
    policy.train()
    if args.fsdp:  # sharded before the reference loads (two whole 6.9B models would not fit one GPU)
        shard_model(policy, args.bf16 and device.type == "cuda")  # its gradients are reduce-scattered
    ref_model = load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision)
    ref_model.eval().requires_grad_(False)
    if args.fsdp:
        shard_model(ref_model, args.bf16 and device.type == "cuda")
        print(f"[rank {rank}] FSDP holds {sum(p.to_local().numel() for p in policy.parameters())} of the "
              f"{sum(p.numel() for p in policy.parameters())} parameters", flush=True)

    @torch.no_grad()
    def reference_logprobs(dataset, indices):
        chosen, rejected, query_lengths, _ = collate(dataset, indices)
        with autocast:
            ref_chosen, ref_rejected = concatenated_logprobs(ref_model, chosen, rejected, query_lengths, pad_token_id)
        return ref_chosen.float(), ref_rejected.float()

    precomputed = {}  # (split, dataset index) -> (ref_chosen, ref_rejected), filled only with --precompute-ref-logprobs
    if args.precompute_ref_logprobs:
        # The same micro-batches as training, so the numbers match the on-the-fly ones; then free the reference.
        jobs = [("train", train_dataset, micro) for batch in local_batches
                for micro in chunks(batch, args.local_micro_batch_size)]
        jobs += [(split, ds, micro) for split, ds in eval_splits.items()  # with the evaluation's filler chunks
                 for micro, _ in eval_chunks(eval_shard(ds), args.local_eval_batch_size, eval_longest(ds), 0)]
        start_time = time.time()
        for step, (split, dataset, micro) in enumerate(jobs, 1):
            ref_chosen, ref_rejected = reference_logprobs(dataset, micro)
            precomputed.update({(split, i): (c, r) for i, c, r in zip(micro, ref_chosen, ref_rejected)})
            if rank == 0 and (step % 50 == 0 or step == len(jobs)):
                progress("dpo: reference log-probs", step, len(jobs), start_time)
        del ref_model
        ref_model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def get_reference(split, dataset, indices):
        if ref_model is None:
            ref = [precomputed[(split, i)] for i in indices]
            return torch.stack([c for c, _ in ref]), torch.stack([r for _, r in ref])
        return reference_logprobs(dataset, indices)

    if world_size > 1 and not args.fsdp:
        model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = policy
    # weight decay 0.01 (torch default); fused kernel on CUDA (the same update up to rounding)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # cosine to 0 over the updates, no warm-up
        optimizer, lambda update: 0.5 * (1.0 + math.cos(math.pi * update / num_updates)))
    first_update = 0
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, sharded or not
    if checkpoint is not None:  # resume: weights, AdamW moments, schedule, random streams; the data position is the
        set_state_dict(policy, optimizer, model_state_dict=checkpoint["model"],  # update counter (local_batches is
                       optim_state_dict=checkpoint["optimizer"], options=full_state)  # fixed by --seed)
        scheduler.load_state_dict(checkpoint["scheduler"])
        first_update = checkpoint["update"]
        set_rng_states(checkpoint["rng"], rank)
        print(f"resumed from update {first_update} of {output_dir}/checkpoints", flush=True)
        del checkpoint

    start_time = time.time()
    for update, local_batch in enumerate(local_batches, 1):
        if update <= first_update:
            continue  # done before the checkpoint
        micro_batches = chunks(local_batch, args.local_micro_batch_size)
        assert len(micro_batches) == grad_accum, (len(micro_batches), grad_accum)
        stats = torch.zeros(7, device=device)
        for micro_step, micro in enumerate(micro_batches, 1):
            chosen, rejected, query_lengths, _ = collate(train_dataset, micro)  # (b, T), (b, T), (b,)
            ref_chosen, ref_rejected = get_reference("train", train_dataset, micro)  # (b,), (b,)
            sync = micro_step == grad_accum or world_size == 1
            if args.fsdp:  # FSDP: the same, by switching the reduce-scatter off
                policy.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or args.fsdp else model.no_sync():  # DDP: on the last micro-batch
                with autocast:
                    pi_chosen, pi_rejected = concatenated_logprobs(model, chosen, rejected, query_lengths, pad_token_id)
                    loss, chosen_rewards, rejected_rewards = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected,
                                                                      args.beta, args.loss_type, args.label_smoothing)
                assert loss.dim() == 0, f"the loss must be a scalar, got shape {tuple(loss.shape)}"
                (loss / grad_accum).backward()  # gradients averaged over micro-batches (and over ranks by DDP)
            accuracy = preference_accuracy(chosen_rewards, rejected_rewards)
            stats += torch.stack([loss.detach(), accuracy.mean(), chosen_rewards.mean(), rejected_rewards.mean(),
                                  (chosen_rewards - rejected_rewards).mean(), pi_chosen.detach().mean(),
                                  pi_rejected.detach().mean()]).float() / grad_accum
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        if world_size > 1:
            dist.all_reduce(stats)
            stats /= world_size
        check_finite("train/loss", stats[0], f"update {update}", dict(pair_indices=torch.tensor(local_batch)),
                     output_dir, rank, world_size)
        stats = stats.tolist()
        metrics = {"train/loss": stats[0], "train/accuracy": stats[1], "train/reward_preferred": stats[2],
                   "train/reward_rejected": stats[3], "train/reward_margin": stats[4], "train/lr": lr,
                   "train/logps_chosen": stats[5], "train/logps_rejected": stats[6],
                   "train/episode": update * args.batch_size}
        logger.log(metrics, step=update)
        if rank == 0:
            progress("dpo", update, num_updates, start_time, first_update, loss=stats[0], accuracy=stats[1],
                     margin=stats[4], lr=lr)
        if update == num_updates or (args.checkpoint_every and update % args.checkpoint_every == 0):
            states = rng_states(world_size)  # every process takes part; rank 0 writes
            model_state, optimizer_state = get_state_dict(policy, optimizer, options=full_state)  # gathers FSDP shards
            if rank == 0:
                save_checkpoint(output_dir, update, dict(
                    model=model_state, optimizer=optimizer_state, scheduler=scheduler.state_dict(),
                    update=update, rng=states, args=asdict(args), run_name=run_name, **logger.state()),
                    args.keep_checkpoints)

    policy_state = get_model_state_dict(policy, options=full_state)  # whole tensors, also under FSDP (a collective)
    if rank == 0:
        policy.save_pretrained(output_dir, state_dict=policy_state)
        tokenizer.save_pretrained(output_dir)
        print(f"saved the policy and tokenizer to {output_dir}", flush=True)

    if args.run_eval:
        policy.eval()
        # 1. Implicit-reward accuracy on the preference validation splits, by split, batch and confidence.
        for split, dataset in eval_splits.items():
            rows = []
            for micro, keep in eval_chunks(eval_shard(dataset), args.local_eval_batch_size, eval_longest(dataset), 0):
                chosen, rejected, query_lengths, data = collate(dataset, micro)
                ref_chosen, ref_rejected = get_reference(split, dataset, micro)
                with torch.no_grad(), autocast:
                    pi_chosen, pi_rejected = concatenated_logprobs(policy, chosen, rejected, query_lengths,
                                                                   pad_token_id)
                if not keep:
                    continue
                _, chosen_rewards, rejected_rewards = dpo_loss(pi_chosen.float(), pi_rejected.float(), ref_chosen,
                                                               ref_rejected, args.beta, args.loss_type,
                                                               args.label_smoothing)
                accuracy = preference_accuracy(chosen_rewards, rejected_rewards)
                for j in range(len(micro)):
                    rows.append(dict(id=data["id"][j], query=data["query"][j], chosen=data["chosen"][j],
                                     rejected=data["rejected"][j], reward_chosen=chosen_rewards[j].item(),
                                     reward_rejected=rejected_rewards[j].item(), accuracy=accuracy[j].item(),
                                     split=data["split"][j], batch=data["batch"][j],
                                     confidence=data["confidence"][j]))
            rows = gather_rows(rows, world_size)
            if rank == 0 and rows:
                metrics = accuracy_breakdown(rows, f"eval/{split}")
                logger.log(metrics, step=num_updates)
                logger.table(f"eval_{split}", [{k: v for k, v in r.items() if k != "accuracy"} for r in rows],
                             output_dir)
                print(f"eval/{split}: accuracy {metrics[f'eval/{split}/accuracy']:.4f} on {len(rows)} pairs",
                      flush=True)

        # 2. Generations on the SFT validation posts: eval_response_length tokens at temperature 0.01, cut at EOS.
        rows = []
        shard = eval_shard(query_dataset)
        for micro, keep in eval_chunks(shard, args.local_eval_batch_size, eval_longest(query_dataset), 0):
            data = query_dataset[micro]
            infos = [{k: data[k][j] for k in SFT_COLUMNS} for j in range(len(micro))]
            query_tokens = [tokenize_query(tokenizer, info, args.query_length) for info in infos]
            queries = torch.tensor([left_pad(q, args.query_length, pad_token_id) for q in query_tokens], device=device)
            with autocast:
                query_responses, _ = generate(policy, queries, pad_token_id, args.eval_response_length, 0.01)
            if not keep:
                continue
            responses = truncate_response(eos_token_id, pad_token_id, query_responses[:, args.query_length:])  # (b, R)
            has_eos = (responses == eos_token_id).any(1)
            response_tokens = torch.clamp(first_true_indices(responses == eos_token_id) + 1, max=responses.size(1))
            for j, info in enumerate(infos):
                rows.append(dict(id=info["id"], query=tokenizer.decode(query_tokens[j]),
                                 response=tokenizer.decode(responses[j], skip_special_tokens=True),
                                 reference=info["summary"], has_eos=bool(has_eos[j]),
                                 response_tokens=int(response_tokens[j])))
        rows = gather_rows(rows, world_size)
        if rank == 0 and rows:
            logger.log({"eval/generations/has_eos": sum(r["has_eos"] for r in rows) / len(rows),
                        "eval/generations/response_tokens": sum(r["response_tokens"] for r in rows) / len(rows)},
                       step=num_updates)
            logger.table("eval_generations", rows, output_dir)
            print(f"eval_generations: {len(rows)} posts, "
                  f"{sum(r['has_eos'] for r in rows)} ended with EOS", flush=True)

    if world_size > 1:
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
