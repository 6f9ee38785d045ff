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
import gc
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
    """SFT checkpoint (hub id or folder): initialises the policy and the frozen reference; its tokenizer is used"""
    sft_model_revision: Optional[str] = None
    """hub branch, tag or commit of --sft-model-path (e.g. a run of the paper's release); None: main; not a folder's"""
    label_dataset: str = "vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"
    """preference pairs (hub id or folder; OpenAI or prompt/chosen/rejected columns): "train" trains, others evaluate"""
    label_dataset_revision: Optional[str] = None
    """hub branch, tag or commit of --label-dataset; None: the main branch; not for a local folder"""
    query_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT set (hub id or folder): its validation posts (prompts) and summaries (references) for the generation eval"""
    query_dataset_revision: Optional[str] = None
    """hub branch, tag or commit of --query-dataset; None: the main branch; not for a local folder"""
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
    """sigmoid: DPO (Rafailov et al. 2023, eq. 7); ipo: IPO (Azar et al. 2023, eq. 17); label_smoothing: cDPO"""
    label_smoothing: float = 0.0
    """label-flip probability in (0, 0.5) of cDPO (conservative DPO, Mitchell 2023); must be 0 with the other losses"""
    precompute_ref_logprobs: bool = False
    """compute the reference's sequence log-probs once before training, then free it; False: computed on the fly"""
    fsdp: bool = False
    """shard policy (parameters, gradients, AdamW states) and reference over the processes with FSDP2 (torchrun)"""
    num_eval_samples: Optional[int] = None
    """number of SFT validation posts (the first ones) generated for in the evaluation; None = the whole split"""
    cnndm_query_length: int = 1919
    """query length in tokens of the CNN/DM rows (validation_cnndm; the reference's 2047 - 128), not the TL;DR posts'"""


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
# logged per update as train/rm/{name}, means over the pairs: the reference DPO's names (its "preferred" is "chosen")
TRAIN_METRICS = ["loss", "accuracy", "chosen_rewards", "rejected_rewards", "reward_margin", "logps_chosen",
                 "logps_rejected"]


def validate_args(args, world_size):
    """Fail on a bad argument, naming it, before any data or model loads; returns gradient_accumulation_steps."""
    for name in ["query_length", "response_length", "eval_response_length", "batch_size", "local_micro_batch_size",
                 "local_eval_batch_size", "cnndm_query_length", "beta", "num_eval_samples"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.loss_type == "label_smoothing" and not 0 < args.label_smoothing < 0.5:
        raise ValueError(f"--loss-type label_smoothing needs --label-smoothing in (0, 0.5), got {args.label_smoothing}")
    if args.loss_type != "label_smoothing" and args.label_smoothing != 0:
        raise ValueError(f"--label-smoothing {args.label_smoothing} is read only by --loss-type label_smoothing; "
                         f"with --loss-type {args.loss_type} it would be ignored")
    if args.total_episodes is not None and args.total_episodes < args.batch_size:
        raise ValueError(f"--total-episodes {args.total_episodes} is smaller than one --batch-size {args.batch_size}")
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
    """Token ids and texts of one pair: the query in the TL;DR format [D2.2] (CNN/DM rows: the article format; standard
    rows: the prompt as is, `fallback_id` if they have no id), each response its text's tokens + EOS [D5] (the OpenAI
    texts begin with a space)."""
    if data_format == "openai":
        info, choice = row["info"], row["choice"]
        if info.get("post") is None and info.get("article") is not None:
            query_token = tokenize_article(tokenizer, info["article"], cnndm_query_length)
        else:
            query_token = tokenize_query(tokenizer, info, query_length)  # [D2.2]
        chosen, rejected = row["summaries"][choice]["text"], row["summaries"][1 - choice]["text"]
        extra = row["extra"] or {}
        meta = dict(id=info["id"], split=row["split"], batch=row["batch"], confidence=extra.get("confidence"))
    else:
        query_token, chosen, rejected = tokenizer.encode(row["prompt"]), row["chosen"], row["rejected"]
        meta = dict(id=str(row["id"]) if "id" in row else fallback_id, split=None, batch=None, confidence=None)
    eos = [tokenizer.eos_token_id]
    return dict(query_token=query_token, chosen_token=tokenizer.encode(chosen, add_special_tokens=False) + eos,
                rejected_token=tokenizer.encode(rejected, add_special_tokens=False) + eos,
                query=tokenizer.decode(query_token), chosen=chosen, rejected=rejected, **meta)


def collate_pairs(pairs, pad_token_id):
    """chosen, rejected (B, T): query + response right-padded to the batch's longest, at most query + --response-length
    [D5] (trailing all-pad columns change nothing under causal attention), and the query lengths (B,)."""
    queries = pairs["query_token"]
    sequences = [[q + r for q, r in zip(queries, pairs[f"{side}_token"])] for side in ["chosen", "rejected"]]
    length = max(len(s) for side in sequences for s in side)
    chosen, rejected = (torch.tensor([s + [pad_token_id] * (length - len(s)) for s in side]) for side in sequences)
    return chosen, rejected, torch.tensor([len(q) for q in queries])


def concatenated_logprobs(model, chosen, rejected, query_lengths, pad_token_id):
    """Sequence log-probs of chosen and rejected (B,), (B,) from one forward over the 2B sequences: the sum of
    log pi(token | prefix) over the response tokens including the EOS, the query and the right padding masked. The LM
    head runs from the earliest response token on: the logits of the query tokens before it are never used."""
    query_responses = torch.cat([chosen, rejected])  # (2B, T)
    start = int(query_lengths.min())  # no sequence has a response token before it
    tokens = query_responses[:, start:]  # (2B, T - start): every response token, and some query and pad tokens
    positions = torch.arange(start, query_responses.size(1), device=tokens.device).unsqueeze(0)  # (1, T - start)
    mask = (positions >= query_lengths.repeat(2).unsqueeze(1)) & (tokens != pad_token_id)  # (2B, T - start)
    logits = forward(model, query_responses, pad_token_id, logits_to_keep=tokens.size(1) + 1).logits  # from start - 1
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (2B, T - start, V): the logits at t predict token t + 1
    token_logprobs = torch.gather(logprobs, 2, tokens.unsqueeze(-1)).squeeze(-1)  # (2B, T - start)
    logps = (token_logprobs * mask).sum(1)  # (2B,)
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
    return losses.mean(), beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


def preference_accuracy(chosen_rewards, rejected_rewards):
    """1 per pair whose chosen response has the strictly higher implicit reward; a tie counts 0, as in the reference."""
    return (chosen_rewards > rejected_rewards).float()


def chunks(items, size):
    return [items[i: i + size] for i in range(0, len(items), size)]


def accuracy_breakdown(rows, prefix):
    """Accuracy and mean reward margin over the pairs, and the accuracy per labelling split, batch and confidence."""
    correct = preference_accuracy(*(torch.tensor([r[k] for r in rows]) for k in ["reward_chosen", "reward_rejected"]))
    correct = correct.tolist()
    metrics = {f"{prefix}/accuracy": sum(correct) / len(rows),
               f"{prefix}/reward_margin": sum(r["reward_chosen"] - r["reward_rejected"] for r in rows) / len(rows)}
    for key in ["split", "batch", "confidence"]:
        for value in sorted({r[key] for r in rows if r[key] is not None}, key=str):
            group = [c for c, r in zip(correct, rows) if r[key] == value]
            metrics[f"{prefix}/accuracy/{key}/{value}"] = sum(group) / len(group)
    return metrics


def main(args):
    rank, world_size, device = init_distributed()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"  # CUDA matmuls; no convolutions here

    # 1. Check the arguments and the datasets before any model loads
    gradient_accumulation_steps = validate_args(args, world_size)
    label_datasets = load_data(args.label_dataset, "--label-dataset", revision=args.label_dataset_revision)
    if "train" not in label_datasets:
        raise ValueError(f"--label-dataset {args.label_dataset}: no 'train' split (has {list(label_datasets)})")
    data_format = preference_format(label_datasets["train"])
    eval_splits = [split for split in label_datasets if split != "train"] if args.run_eval else []
    if args.run_eval:
        query_dataset = load_data(args.query_dataset, "--query-dataset", "validation", args.query_dataset_revision)
        check_columns(query_dataset, ["id", "subreddit", "title", "post", "summary"], "--query-dataset")
        if rank == 0 and (args.num_eval_samples or 0) > len(query_dataset):
            print(f"--num-eval-samples {args.num_eval_samples}: the validation split has only {len(query_dataset)} "
                  f"posts; generating for all of them", flush=True)

    # 2. Tokenise the pairs [D2.2, D5]; drop and count those with a response over --response-length (deviation: the
    #    reference's preprocessing truncates it, cutting off its EOS) or a standard-format prompt over --query-length
    tokenizer = load_tokenizer(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    data = {}
    for split in ["train"] + eval_splits:
        dataset = label_datasets[split]  # not empty: load_data refuses an empty split
        data[split] = dataset.map(
            lambda row, i: tokenize_pair(tokenizer, row, args.query_length, data_format, f"{split}-{i}",
                                         args.cnndm_query_length),
            with_indices=True, remove_columns=dataset.column_names, keep_in_memory=True).filter(
            lambda r: (data_format == "openai" or len(r["query_token"]) <= args.query_length)
            and max(len(r["chosen_token"]), len(r["rejected_token"])) <= args.response_length, keep_in_memory=True)
        if rank == 0:
            print(f"--label-dataset split {split}: kept {len(data[split])} of {len(dataset)} pairs (dropped: a "
                  f"response over --response-length {args.response_length} tokens incl. EOS, or a query over "
                  f"--query-length)", flush=True)
    num_pairs = len(data["train"]) if args.total_episodes is None else args.total_episodes
    if not args.batch_size <= num_pairs <= len(data["train"]):
        raise ValueError(f"--total-episodes {args.total_episodes}: training takes at least one --batch-size "
                         f"({args.batch_size}) and at most the {len(data['train'])} training pairs kept")
    num_updates = num_pairs // args.batch_size
    # the reference's DataLoader shuffle: one shuffle shared by all processes, each batch cut into per-process slices
    local_batches = [rank_batch_indices(len(data["train"]), args.batch_size, update, rank, world_size, args.seed)
                     for update in range(num_updates)]
    print(f"[rank {rank}] trains on {num_updates * len(local_batches[0])} pairs in {num_updates} updates "
          f"({num_pairs % args.batch_size} pairs left over); first pair indices {local_batches[0][:8]}", flush=True)

    # 3. Policy and frozen reference, both the SFT model without dropout [D7]; AdamW, cosine to 0 without warm-up
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = find_checkpoint(args, output_dir, world_size)
    run_name = checkpoint["run_name"] if checkpoint else run_name
    seed_everything(args.seed + rank * 100003)
    logger = Logger(args, run_name, output_dir, rank, checkpoint)  # the first write into output_dir
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    policy = load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision).train()
    if args.fsdp:  # sharded before the reference loads (two whole 6.9B models would not fit one GPU)
        shard_model(policy, args.bf16 and device.type == "cuda")  # its gradients are reduce-scattered
    ref_model = load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision).requires_grad_(False)
    ref_model.eval()
    if args.fsdp:
        shard_model(ref_model, args.bf16 and device.type == "cuda")
        print(f"[rank {rank}] FSDP holds {sum(p.to_local().numel() for p in policy.parameters())} of the "
              f"{sum(p.numel() for p in policy.parameters())} parameters", flush=True)
    ddp = world_size > 1 and not args.fsdp
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    # weight decay 0.01 (torch default); fused kernel on CUDA (the same update up to rounding)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=args.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 0.5 * (1 + math.cos(math.pi * u / num_updates)))
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, sharded or not
    first_update = checkpoint["update"] if checkpoint else 0
    if checkpoint is not None:  # resume: weights, AdamW moments, schedule, random streams (the data follow the update)
        set_state_dict(policy, optimizer, model_state_dict=checkpoint["model"],
                       optim_state_dict=checkpoint["optimizer"], options=full_state)
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"], rank)
        print(f"resumed from update {first_update} of {output_dir}/checkpoints", flush=True)
        del checkpoint

    def pair_logprobs(net, split, indices):
        """Sequence log-probs (b,), (b,) under `net` of the chosen and rejected responses of data[split][indices]."""
        chosen, rejected, query_lengths = (t.to(device) for t in collate_pairs(data[split][indices], pad_token_id))
        with autocast:
            return concatenated_logprobs(net, chosen, rejected, query_lengths, pad_token_id)

    @torch.no_grad()
    def reference_logprobs(split, indices):
        """The frozen reference's sequence log-probs (b,), (b,): precomputed, or a forward now."""
        return precomputed[split, tuple(indices)] if ref_model is None else pair_logprobs(ref_model, split, indices)

    def eval_batches(items):
        """This process's contiguous share of `items` in chunks, as many as on every process (eval_chunks)."""
        share = math.ceil(len(items) / world_size)
        filler = items[0] if items else None
        return eval_chunks(items[rank * share: (rank + 1) * share], args.local_eval_batch_size, share, filler)

    precomputed = {}  # (split, micro-batch's pair indices) -> (ref_chosen, ref_rejected), --precompute-ref-logprobs
    if args.precompute_ref_logprobs:  # on the micro-batches of training and evaluation (the same numbers)
        jobs = [("train", micro) for batch in local_batches for micro in chunks(batch, args.local_micro_batch_size)]
        jobs += [(split, micro) for split in eval_splits for micro, _ in eval_batches(list(range(len(data[split]))))]
        start_time = time.time()
        for step, (split, micro) in enumerate(jobs, 1):
            precomputed[split, tuple(micro)] = reference_logprobs(split, micro)
            if rank == 0 and (step % 50 == 0 or step == len(jobs)):
                progress("dpo: reference log-probs", step, len(jobs), start_time)
        ref_model = None  # frees the reference

    # 4. Train, one pass: per update --batch-size pairs in micro-batches; gradients reduced on the last micro-batch only
    start_time = time.time()
    for update in range(first_update, num_updates):
        stats = torch.zeros(len(TRAIN_METRICS), device=device)
        for micro_step, micro in enumerate(chunks(local_batches[update], args.local_micro_batch_size), 1):
            ref_chosen, ref_rejected = reference_logprobs("train", micro)  # (b,), (b,)
            sync = micro_step == gradient_accumulation_steps
            if args.fsdp:
                policy.set_requires_gradient_sync(sync)
            with model.no_sync() if ddp and not sync else contextlib.nullcontext():
                pi_chosen, pi_rejected = pair_logprobs(model, "train", micro)  # (b,), (b,)
                loss, chosen_rewards, rejected_rewards = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected,
                                                                  args.beta, args.loss_type, args.label_smoothing)
                (loss / gradient_accumulation_steps).backward()  # gradients averaged over micro-batches (and ranks)
            stats += torch.stack([  # in the order of TRAIN_METRICS
                loss.detach(), preference_accuracy(chosen_rewards, rejected_rewards).mean(), chosen_rewards.mean(),
                rejected_rewards.mean(), (chosen_rewards - rejected_rewards).mean(), pi_chosen.detach().mean(),
                pi_rejected.detach().mean()]) / gradient_accumulation_steps
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        # 5. Log the means over all processes, stop on a non-finite loss, checkpoint
        stats = gather_mean(stats, world_size)
        check_finite("train/rm/loss", stats[0], f"update {update + 1}",
                     dict(pair_indices=torch.tensor(local_batches[update])), output_dir, rank, world_size)
        metrics = {f"train/rm/{name}": value for name, value in zip(TRAIN_METRICS, stats.tolist())}
        logger.log({**metrics, "train/rm/lr": lr, "train/episode": (update + 1) * args.batch_size}, step=update + 1)
        if rank == 0:
            progress("dpo", update + 1, num_updates, start_time, first_update, loss=metrics["train/rm/loss"],
                     accuracy=metrics["train/rm/accuracy"], margin=metrics["train/rm/reward_margin"], lr=lr)
        if update + 1 == num_updates or (args.checkpoint_every and (update + 1) % args.checkpoint_every == 0):
            states = rng_states(world_size)  # every process takes part; rank 0 writes
            model_state, optimizer_state = get_state_dict(policy, optimizer, options=full_state)  # gathers FSDP shards
            if rank == 0:
                save_checkpoint(output_dir, update + 1, dict(
                    model=model_state, optimizer=optimizer_state, scheduler=scheduler.state_dict(), update=update + 1,
                    rng=states, args=asdict(args), run_name=run_name, **logger.state()), args.keep_checkpoints)

    # 6. Save the policy and tokenizer (rank 0)
    policy_state = get_model_state_dict(policy, options=full_state)  # whole tensors, also under FSDP (a collective)
    if rank == 0:
        policy.save_pretrained(output_dir, state_dict=policy_state)
        tokenizer.save_pretrained(output_dir)

    # 7. Evaluate: the implicit-reward accuracy on each preference split (by split, batch and confidence), then
    #    --eval-response-length tokens at temperature 0.01, cut after the first EOS, for the SFT validation posts
    if args.run_eval:
        policy.eval()
        torch.set_grad_enabled(False)  # evaluation only from here
        for split in eval_splits:
            rewards = []  # (chosen, rejected) of this process's pairs
            for micro, keep in eval_batches(list(range(len(data[split])))):
                _, chosen_rewards, rejected_rewards = dpo_loss(*pair_logprobs(policy, split, micro),
                                                               *reference_logprobs(split, micro), args.beta,
                                                               args.loss_type, args.label_smoothing)
                rewards += list(zip(chosen_rewards.tolist(), rejected_rewards.tolist())) if keep else []
            rewards = gather_rows(rewards, world_size)  # every pair's, in the dataset's order
            if rank == 0 and rewards:
                texts = data[split].remove_columns(["query_token", "chosen_token", "rejected_token"])
                rows = [dict(pair, reward_chosen=chosen, reward_rejected=rejected)
                        for pair, (chosen, rejected) in zip(texts, rewards, strict=True)]
                metrics = accuracy_breakdown(rows, f"eval/{split}")
                logger.log(metrics, step=num_updates)
                logger.table(f"eval_{split}", rows, output_dir)
                print(f"eval/{split}: accuracy {metrics[f'eval/{split}/accuracy']:.4f} on {len(rows)} pairs")

        posts = [dict(id=row["id"], query=tokenize_query(tokenizer, row, args.query_length), reference=row["summary"])
                 for row in query_dataset.select(range(len(query_dataset))[: args.num_eval_samples])]
        rows = []
        for batch, keep in eval_batches(posts):
            queries = torch.tensor([[pad_token_id] * (args.query_length - len(p["query"])) + p["query"] for p in batch])
            with autocast:
                query_responses, _ = generate(policy, queries.to(device), pad_token_id, args.eval_response_length, 0.01)
            for p, response in zip(batch, query_responses[:, args.query_length:].tolist()) if keep else []:
                n = response.index(eos_token_id) + 1 if eos_token_id in response else len(response)  # [D23.2]
                rows.append(dict(id=p["id"], query=tokenizer.decode(p["query"]),
                                 response=tokenizer.decode(response[:n], skip_special_tokens=True),
                                 reference=p["reference"], has_eos=eos_token_id in response, response_tokens=n))
        rows = gather_rows(rows, world_size)
        if rank == 0 and rows:
            logger.log({f"eval/generations/{key}": sum(r[key] for r in rows) / len(rows)
                        for key in ["has_eos", "response_tokens"]}, step=num_updates)
            logger.table("eval_generations", rows, output_dir)
            print(f"eval_generations: {len(rows)} posts, {sum(r['has_eos'] for r in rows)} ended with EOS", flush=True)

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
