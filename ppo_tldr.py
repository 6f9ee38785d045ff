# See README.md "ppo_tldr.py" for the list of N+ details, the deviations from the reference and the benchmarks.
"""PPO for TL;DR summarisation, faithful to the N+ reference (Huang et al. 2024, arXiv 2403.17031).

One GPU (1B, the paper's global batch of 512 episodes through gradient accumulation):
    python ppo_tldr.py --total-episodes 1000000
Eight GPUs (the paper's set-up):
    torchrun --nproc-per-node 8 ppo_tldr.py --total-episodes 1000000 --local-micro-batch-size 16
The tiny offline world (CPU, about a minute; see README.md "The tiny offline TL;DR world"); the random base model
stands in for the SFT policy and a reward model is trained first:
    python benchmark/offline_world.py --out-dir world --size tiny
    python reward_model.py --sft-model-path world/base_model --label-dataset world/tldr_preference \\
        --query-dataset world/tldr_sft --query-length 128 --lr 3e-4 --batch-size 32 --output-dir world/reward_model
    python ppo_tldr.py --sft-model-path world/base_model --reward-model-path world/reward_model \\
        --query-dataset world/tldr_sft --query-length 128 --total-episodes 256 --batch-size 32 \\
        --local-micro-batch-size 16 --local-rollout-forward-batch-size 32 --lr 1e-4
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
import torch.nn as nn
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import cached_file

from value_head import ScalarModel, get_reward

INVALID_LOGPROB = 1.0  # log-prob written at positions after the EOS, so that the per-token KL there is 0


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
    # ---- models and data ----
    sft_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
    """the SFT policy: initialises the policy and the frozen reference policy"""
    sft_model_revision: Optional[str] = None
    """branch, tag or commit of --sft-model-path on the hub (e.g. a run of the paper's release); None: the main
    branch. Only for a hub id (a local folder has none)"""
    reward_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"
    """the reward model (value_head folder, the N+ reference's ScalarModel, or a one-label
    AutoModelForSequenceClassification); also initialises the value model"""
    reward_model_revision: Optional[str] = None
    """branch, tag or commit of --reward-model-path on the hub (e.g. a run of the paper's release); None: the main
    branch. Only for a hub id (a local folder has none)"""
    query_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """TL;DR posts: train split for rollouts (and its reference summaries for a missing reward bias), validation for
    the per-update score, validation + test for evaluation"""
    query_dataset_revision: Optional[str] = None
    """branch, tag or commit of --query-dataset on the hub; None: the main branch. Only for a hub id (a local
    folder has none)"""
    query_length: int = 512
    """query length in tokens; longer posts are cut at their last newline [D2.2], shorter ones left-padded"""
    response_length: int = 53
    """tokens sampled per response; sampling never stops early [D23.1]"""
    compute_missing_bias: bool = True
    """a reward model whose files hold no normalisation bias (the hub's converted sequence classifier) gets it at the
    start as reward_model.py sets it [D15]: the mean score of --query-dataset's train reference summaries; it is
    printed, logged and saved with the value model. A stored bias is used as it is. Off: bias 0"""
    num_normalization_samples: Optional[int] = None
    """reference summaries (the first ones of the train split) scored for a missing bias; None: all (as
    reward_model.py's default)"""
    normalization_response_length: int = 169
    """reward_model.py's --response-length for a missing bias: longer reference summaries (tokens, EOS included) are
    left out, and query + summary are right-padded to --query-length + this"""
    # ---- batch sizes ----
    total_episodes: int = 1_000_000
    """episodes (sampled responses) to train on; updates = total_episodes // batch_size"""
    batch_size: int = 512
    """episodes per PPO update over all devices (the algorithm's knob; independent of the number of devices)"""
    num_mini_batches: int = 1
    """mini-batches per PPO epoch (one optimizer step each)"""
    local_micro_batch_size: int = 16
    """episodes per device per forward/backward; gradient accumulation = batch_size / num_mini_batches /
    (local_micro_batch_size * devices)"""
    local_rollout_forward_batch_size: int = 64
    """queries per device per generation/scoring chunk (bounds the memory of rollouts and evaluation)"""
    # ---- optimisation ----
    lr: float = 3e-6
    """learning rate, decayed linearly to 0 over the updates"""
    eps: float = 1e-5
    """AdamW epsilon"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of policy and value model (for large models)"""
    fsdp: bool = False
    """shard the four models' parameters (and the trained ones' gradients and AdamW states) over the processes with
    PyTorch FSDP2 `fully_shard` instead of replicating them with DDP: for the 2.8B and 6.9B runs (see README.md
    "Multi-GPU and memory"); needs torchrun"""
    # ---- PPO ----
    num_ppo_epochs: int = 4
    """passes over each batch of episodes"""
    temperature: float = 0.7
    """sampling temperature; every forward's logits are divided by it too [D23.1]"""
    kl_coef: float = 0.05
    """coefficient of the per-token KL penalty (fixed, as in the reference; the initial value under --kl-target)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward and in objective/kl: k1 = log pi - log ref (the reference's); k3 =
    (r - 1) - log r with r = ref / pi (Schulman 2020; >= 0, unbiased; TRL's kl_estimator="k3")"""
    kl_target: Optional[float] = None
    """adaptive KL control (Ziegler et al. 2019, lm-human-preferences' AdaptiveKLController): after each update
    the coefficient is multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * batch_size / kl_horizon, with KL the
    batch's mean summed per-response KL (nats); None keeps --kl-coef fixed"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller, in episodes (only with --kl-target)"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip range"""
    cliprange_value: float = 0.2
    """value clip range (around the rollout's values)"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    missing_eos_score: Optional[float] = -1.0
    """score that replaces the reward of a response without EOS [D23.3]; None keeps the reward model's score"""
    whiten_rewards: bool = False
    """whiten the per-token rewards before GAE (off in the reference)"""
    global_advantage_whitening: bool = False
    """whiten the advantages with the mean and variance of the whole batch over all processes (all-reduced); off:
    each process whitens its own share, as the reference does (the same thing with one process)"""
    score_at_eos: bool = False
    """add the score at the EOS token instead of one position after it (the reference's placement, the default)"""
    local_eval_batch_size: int = 2
    """validation prompts per process sampled at temperature 0.01 before every rollout for
    `objective/validation_score` (distinct on each process: rows [rank * N, (rank + 1) * N) of the validation split)"""
    sample_table_every: int = 220
    """save the validation sample (all processes' rows, with their scores) as a table at updates 1, 1 + N, 1 + 2N, ...
    (the reference's `(update - 1) % 220 == 0`) and at the last update (deviation: not in the reference); 0: at the
    last update only"""
    num_eval_samples: Optional[int] = None
    """posts of each of validation and test evaluated after training (None: all)"""
    group_by_length: bool = False
    """sort each process's rollout queries by their token count before cutting them into chunks of
    --local-rollout-forward-batch-size (the episodes are put back in prompt order after the rollout), so that each
    chunk drops more common left padding: faster when a process has several chunks. It changes which random draws
    each prompt's response gets (not their distribution, nor the update's micro-batches); off: the reference's order"""
    compile: bool = False
    """torch.compile the four models' forwards (dynamic shapes: chunk widths and generation lengths vary); the
    compilation happens in the first update, whose time/* (seconds) include it (the later updates run compiled)"""


# ------------------------------------------------------------ helpers ------------------------------------------


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


def trim_left_padding(tokens, pad_token_id):
    """`tokens` (B, T) without its leading columns that are pad in every row: a chunk's common left padding, on which
    no forward needs to run (position ids come from the attention mask, so the outputs at the kept positions are the
    same up to float rounding). Keeps at least the last column."""
    start = min(int(first_true_indices((tokens != pad_token_id).any(0, keepdim=True))), tokens.size(1) - 1)
    return tokens[:, start:]


def trim_right_padding(tokens, pad_token_id):
    """`tokens` (B, T) without its trailing columns that are pad in every row (when every response of a chunk ended
    early): a causal model's outputs at the kept positions do not depend on them. Keeps at least the first column."""
    holds_a_token = (tokens != pad_token_id).any(0, keepdim=True).flip(1)
    return tokens[:, : max(tokens.size(1) - int(first_true_indices(holds_a_token)), 1)]


def length_groups(queries, chunk_size, pad_token_id, group_by_length):
    """Row indices of each rollout chunk of `chunk_size` queries: in order, or under `group_by_length` with the rows
    sorted by their number of query tokens (stable), so that each chunk's common left padding is large."""
    order = torch.arange(queries.size(0), device=queries.device)
    if group_by_length:
        order = torch.sort((queries != pad_token_id).sum(1), stable=True).indices
    return list(order.split(chunk_size))


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


def right_pad(tokens, length, pad_token_id):
    return tokens + [pad_token_id] * (length - len(tokens))


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
    queries, responses, dropped = [], [], 0
    for row in rows:
        response = tokenizer.encode(" " + row["summary"]) + [tokenizer.eos_token_id]  # leading space, EOS [D3]
        if len(response) > response_length:
            dropped += 1
            continue
        queries.append(tokenize_query(tokenizer, row, query_length))  # [D2.2]
        responses.append(response)
    return queries, responses, dropped


@torch.no_grad()
def normalization_bias(reward_model, queries, responses, pad_token_id, length, batch_size, device, rank, world_size,
                       autocast):
    """(bias, stats) as reward_model.py computes them after training [D15]: each query + reference summary
    right-padded to `length` tokens and scored at its EOS; each process scores its share (the same number of forwards
    everywhere, for FSDP) and every process gets all scores in the same order (all_gather_object: no tensor in the
    collective), hence the same bias."""
    share, scores = list(range(rank, len(queries), world_size)), []
    for idxs, keep in eval_chunks(share, batch_size, math.ceil(len(queries) / world_size), 0):
        batch = torch.tensor([right_pad(queries[i] + responses[i], length, pad_token_id) for i in idxs], device=device)
        with autocast:
            _, score, _ = get_reward(reward_model, batch, pad_token_id, context_length=0)
        if keep:
            scores += score.float().tolist()
    return normalization_stats(gather_rows(scores, world_size))


def masked_mean(values, mask, axis=None):
    """Mean of `values` over the positions where `mask` is true."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    """Variance of `values` over the positions where `mask` is true (Bessel-corrected if `unbiased`)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum < 2:
            raise ValueError(f"an unbiased variance needs at least 2 valid values, the mask has {int(mask_sum)}")
        variance = variance * mask_sum / (mask_sum - 1)
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """(values - mean) / sqrt(var + 1e-8) over the valid positions, biased variance; the mean is added back
    unless `shift_mean`."""
    mean, var = masked_mean(values, mask), masked_var(values, mask, unbiased=False)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def global_masked_whiten(values, mask, world_size):
    """masked_whiten with the mean and (biased) variance over the valid positions of every process's `values`."""
    if world_size == 1:
        return masked_whiten(values, mask)
    sums = torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)])
    dist.all_reduce(sums)
    mean = sums[0] / sums[1]
    squares = ((values - mean) ** 2 * mask).sum()
    dist.all_reduce(squares)
    return (values - mean) * torch.rsqrt(squares / sums[1] + 1e-8)


def per_token_kl(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL estimate (B, R) of the policy from the reference on the sampled tokens (Schulman 2020, "Approximating
    KL divergence"): k1 = log pi - log ref; k3 = (r - 1) - log r with r = ref / pi, >= 0 at every token. Both are 0
    where logprobs and ref_logprobs are equal (INVALID_LOGPROB after the EOS)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs  # log r
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"--kl-estimator must be k1 or k3, got {estimator!r}")


def compute_rewards(scores, logprobs, ref_logprobs, sequence_lengths, kl_coef, score_at_eos=False, kl_estimator="k1"):
    """Per-token rewards (B, R): the KL penalty -kl_coef * KL at every token (k1 estimator in the reference), plus the
    score one position after the EOS as the reference does (at the EOS when it is the last token or there is none;
    always at the EOS with `score_at_eos`). `logprobs` are already INVALID_LOGPROB after the EOS, so the penalty there
    is 0. Returns (rewards, non_score_reward, kl)."""
    kl = per_token_kl(logprobs, ref_logprobs, kl_estimator)  # (B, R)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    sequence_lengths_p1 = sequence_lengths if score_at_eos else sequence_lengths + 1
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    return rewards, non_score_reward, kl


def adaptive_kl_coef(kl_coef, kl, target, horizon, batch_size):
    """The next KL coefficient of the adaptive controller (Ziegler et al. 2019, sec. 2.2): proportional control of the
    measured KL (the batch's mean summed per-response KL) towards `target`, the error clipped to +-20%, over
    `horizon` episodes."""
    proportional_error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * batch_size / horizon)


def compute_advantages(rewards, values, padding_mask, gamma, lam, whiten=masked_whiten):
    """GAE (Schulman et al. 2016, eq. 16) backwards over the response, returns = advantages + values; then the
    advantages are whitened over the valid tokens (by `whiten(values, mask)`) and zeroed where `padding_mask` is
    true."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, R)
    returns = advantages + values
    advantages = whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def logprobs_of(logits, tokens):
    """Log-probabilities (B, R) of `tokens` (B, R) under `logits` (B, R, V) (already divided by the temperature)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


class PolicyAndValueWrapper(nn.Module):
    """Policy and value model as one module: one optimizer and one DDP wrapper over both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.policy(**kwargs, use_cache=use_cache, logits_to_keep=logits_to_keep), self.value_model(**kwargs)


def ppo_update(model, optimizer, rollout, args, pad_token_id, gradient_accumulation_steps, autocast):
    """Step 6 of an update: --num-ppo-epochs passes over this process's episodes, each pass in --num-mini-batches
    mini-batches (one optimizer step each) of micro-batches whose gradients accumulate; under DDP or FSDP gradients are
    reduced over the processes on the last micro-batch only. `rollout`: query_responses (b, Q + R), responses,
    logprobs, values, advantages, returns, padding_mask, padding_mask_p1 (b, R); each micro-batch drops its common
    left padding before its forward (response positions are read from the end). Returns the statistics, each
    (epochs, mini-batches, micro-batches), and the number of optimizer steps taken."""
    local_batch_size = rollout["responses"].size(0)
    local_mini_batch_size = local_batch_size // args.num_mini_batches
    shape, device = (args.num_ppo_epochs, args.num_mini_batches, gradient_accumulation_steps), rollout["responses"].device
    stats = {name: torch.zeros(shape, device=device)  # on the compute device: they are all-reduced (NCCL: never CPU)
             for name in ["approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio"]}
    sharded = [m for m in model.children() if isinstance(m, FSDPModule)]  # policy and value model under --fsdp
    optimizer_steps = 0
    for ppo_epoch_idx in range(args.num_ppo_epochs):
        b_inds = torch.randperm(local_batch_size)
        for minibatch_idx, mini_batch_start in enumerate(range(0, local_batch_size, local_mini_batch_size)):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + local_mini_batch_size]
            for gradient_accumulation_idx, micro_batch_start in enumerate(range(0, local_mini_batch_size, args.local_micro_batch_size)):
                mb_inds = mini_batch_inds[micro_batch_start : micro_batch_start + args.local_micro_batch_size]
                mb_advantage, mb_return = rollout["advantages"][mb_inds], rollout["returns"][mb_inds]
                mb_values, mb_logprobs = rollout["values"][mb_inds], rollout["logprobs"][mb_inds]
                mb_padding_mask, mb_padding_mask_p1 = rollout["padding_mask"][mb_inds], rollout["padding_mask_p1"][mb_inds]
                last_micro_batch = gradient_accumulation_idx == gradient_accumulation_steps - 1
                no_sync = model.no_sync() if isinstance(model, DDP) and not last_micro_batch else contextlib.nullcontext()
                for m in sharded:  # FSDP: the same, by switching the reduce-scatter off
                    m.set_requires_gradient_sync(last_micro_batch)
                with no_sync, autocast:  # gradients are all-reduced (reduce-scattered) on the last micro-batch only
                    # logits at the positions that predict the response tokens: the last R + 1 positions but one
                    mb_query_responses = trim_left_padding(rollout["query_responses"][mb_inds], pad_token_id)
                    output, vpred_temp = forward(model, mb_query_responses, pad_token_id,
                                                 logits_to_keep=rollout["responses"].shape[1] + 1)
                    logits = output.logits[:, :-1].float() / (args.temperature + 1e-7)
                    new_logprobs = logprobs_of(logits, rollout["responses"][mb_inds])
                    new_logprobs = torch.masked_fill(new_logprobs, mb_padding_mask, INVALID_LOGPROB)
                    vpred = vpred_temp[:, -rollout["responses"].shape[1] - 1 : -1].float()
                    vpred = torch.masked_fill(vpred, mb_padding_mask_p1, 0)
                    # clipped value loss (Schulman et al. 2017 PPO; the N+ / lm-human-preferences form)
                    vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value)
                    vf_losses1 = torch.square(vpred - mb_return)
                    vf_losses2 = torch.square(vpredclipped - mb_return)
                    vf_loss_max = torch.max(vf_losses1, vf_losses2)
                    vf_loss = 0.5 * masked_mean(vf_loss_max, ~mb_padding_mask_p1)
                    # clipped surrogate objective (Schulman et al. 2017, eq. 7)
                    logprobs_diff = new_logprobs - mb_logprobs
                    ratio = torch.exp(logprobs_diff)
                    pg_losses = -mb_advantage * ratio
                    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
                    pg_loss_max = torch.max(pg_losses, pg_losses2)
                    pg_loss = masked_mean(pg_loss_max, ~mb_padding_mask)
                    loss = pg_loss + args.vf_coef * vf_loss
                    assert loss.dim() == 0
                    (loss / gradient_accumulation_steps).backward()
                if last_micro_batch:
                    optimizer.step()
                    optimizer.zero_grad()
                    optimizer_steps += 1
                with torch.no_grad():  # statistics over valid tokens only (deviation: the reference's were unmasked)
                    valid = ~mb_padding_mask
                    idx = (ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx)
                    prob_dist = F.softmax(logits, dim=-1)
                    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
                    stats["approxkl"][idx] = 0.5 * masked_mean(logprobs_diff**2, valid)
                    stats["pg_clipfrac"][idx] = masked_mean((pg_losses2 > pg_losses).float(), valid)
                    stats["pg_loss"][idx] = pg_loss
                    stats["vf_loss"][idx] = vf_loss
                    stats["vf_clipfrac"][idx] = masked_mean((vf_losses2 > vf_losses1).float(), ~mb_padding_mask_p1)
                    stats["entropy"][idx] = masked_mean(entropy, valid)
                    stats["ratio"][idx] = masked_mean(ratio, valid)
                del output, vpred_temp, logits, new_logprobs, loss
    return stats, optimizer_steps


def prompt_indices(num_queries, batch_size, update, rank, world_size, seed):
    """This process's train queries for `update` (1-based), reshuffled each time the data is exhausted [D21]: one
    shuffle per pass over the data (seeded with seed + pass, the same on every process), each global batch cut into
    disjoint per-process slices; the incomplete last batch of a pass is dropped. A function of the update counter, so
    a resumed run continues where it stopped."""
    batches_per_pass = num_queries // batch_size
    data_pass, start = divmod((update - 1) * batch_size, batches_per_pass * batch_size)
    order = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed + data_pass))
    local_batch_size = batch_size // world_size
    return order[start + rank * local_batch_size : start + (rank + 1) * local_batch_size]


def validation_indices(num_rows, local_eval_batch_size, rank, world_size):
    """This process's validation prompts, the same at every update (so a resumed run samples the same ones): rows
    [rank * N, (rank + 1) * N) for N = local_eval_batch_size, disjoint across processes. The reference re-reads the
    first batch of its unshuffled validation loader at every update, a loader that accelerate shards by batches
    (process k gets batch k)."""
    if local_eval_batch_size < 1 or local_eval_batch_size * world_size > num_rows:
        raise ValueError(f"--local-eval-batch-size {local_eval_batch_size} x {world_size} process(es) must be "
                         f"between 1 and the {num_rows} rows of the validation split")
    return list(range(rank * local_eval_batch_size, (rank + 1) * local_eval_batch_size))


def reference_logprobs_and_values(ref_policy, value_model, query_responses, response_length, pad_token_id,
                                  temperature):
    """Rollout step 2 on (B, q + R) query-responses (any query width q): the reference policy's log-probabilities of
    the R response tokens at `temperature` and the value model's values of the state before each of them, (B, R) each,
    both read at the last positions (logits of the last R + 1 positions but one; values at positions -R - 1 ... -2)."""
    responses = query_responses[:, -response_length:]
    ref_logits = forward(ref_policy, query_responses, pad_token_id, logits_to_keep=response_length + 1).logits[:, :-1]
    ref_logprobs = logprobs_of(ref_logits / (temperature + 1e-7), responses)
    del ref_logits
    full_values, _, _ = get_reward(value_model, query_responses, pad_token_id, query_responses.size(1) - response_length)
    return ref_logprobs, full_values[:, -response_length - 1 : -1]


@torch.no_grad()
def rollout_scores(policy, reward_model, queries, tokenizer, args, temperature):
    """Sample responses to `queries` in chunks and score them as in the rollout [D23.2, D23.3] (evaluation only).
    Returns the truncated responses (B, R) and their scores (B,)."""
    responses, scores = [], []
    for i in range(0, queries.size(0), args.local_rollout_forward_batch_size):
        query = trim_left_padding(queries[i : i + args.local_rollout_forward_batch_size], tokenizer.pad_token_id)
        query_response, _ = generate(policy, query, tokenizer.pad_token_id, args.response_length, temperature)
        response = truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id, query_response[:, query.size(1):])
        scored = trim_right_padding(torch.cat([query, response], 1), tokenizer.pad_token_id)
        _, score, _ = get_reward(reward_model, scored, tokenizer.pad_token_id, query.size(1))
        if args.missing_eos_score is not None:
            score = torch.where((response == tokenizer.eos_token_id).any(-1), score, args.missing_eos_score)
        responses.append(response)
        scores.append(score)
    return torch.cat(responses), torch.cat(scores)


def main(args):
    rank, world_size, device = init_distributed()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"  # CUDA matmuls; no convolutions here

    # ---- check every argument and the data before any model is loaded ----
    if args.response_length <= 0:
        raise ValueError(f"--response-length must be positive, got {args.response_length}")
    local_batch_size = exact_div(args.batch_size, world_size, "--batch-size over the number of processes")
    local_mini_batch_size = exact_div(local_batch_size, args.num_mini_batches,
                                      "per-process batch (--batch-size / processes) over --num-mini-batches")
    gradient_accumulation_steps = exact_div(local_mini_batch_size, args.local_micro_batch_size,
                                            "per-process mini-batch over --local-micro-batch-size")
    exact_div(local_batch_size, args.local_rollout_forward_batch_size,
              "per-process batch (--batch-size / processes) over --local-rollout-forward-batch-size")
    num_updates = args.total_episodes // args.batch_size
    if num_updates < 1:
        raise ValueError(f"--total-episodes {args.total_episodes} is smaller than one --batch-size {args.batch_size}")
    check_model_path(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    check_model_path(args.reward_model_path, "--reward-model-path", args.reward_model_revision)
    dataset = load_data(args.query_dataset, "--query-dataset", revision=args.query_dataset_revision)
    for split in ["train", "validation"] + (["test"] if args.run_eval else []):
        if split not in dataset:
            raise ValueError(f"--query-dataset {args.query_dataset} has no {split!r} split (it has {list(dataset)})")
        check_columns(dataset[split], ["id", "subreddit", "title", "post"] + (["summary"] if split != "train" else []),
                      f"--query-dataset ({split})")
        if len(dataset[split]) == 0:
            raise ValueError(f"--query-dataset {args.query_dataset}: the {split!r} split is empty")
    if len(dataset["train"]) < args.batch_size:
        raise ValueError(f"--query-dataset train has {len(dataset['train'])} posts, fewer than one --batch-size {args.batch_size}")
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise ValueError(f"--checkpoint-every must be >= 0 and --keep-checkpoints >= 1, got {args.checkpoint_every} "
                         f"and {args.keep_checkpoints}")
    if args.sample_table_every < 0:
        raise ValueError(f"--sample-table-every must be >= 0 (0: the last update only), got {args.sample_table_every}")
    validation_shard = validation_indices(len(dataset["validation"]), args.local_eval_batch_size, rank, world_size)
    if args.fsdp and world_size == 1:
        raise ValueError("--fsdp shards the models over processes: launch with torchrun --nproc-per-node N (N > 1)")
    if args.kl_target is not None and args.kl_target <= 0:
        raise ValueError(f"--kl-target must be positive (a KL in nats per response), got {args.kl_target}")
    if args.kl_horizon <= 0:
        raise ValueError(f"--kl-horizon must be positive (episodes), got {args.kl_horizon}")
    tokenizer = load_tokenizer(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    reward_tokenizer = None  # the reward model reads the policy's token ids: its tokenizer must be the same
    if not cached_file(args.reward_model_path, "tokenizer_config.json", revision=args.reward_model_revision,
                       _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False):
        print(f"[ppo] --reward-model-path {args.reward_model_path} holds no tokenizer: it cannot be checked against "
              f"the policy's, so it is taken to be the same", flush=True)
    else:  # as shipped, without a [PAD] of its own (the hub's): pad ids never reach a model, so [PAD] is left out
        reward_tokenizer = AutoTokenizer.from_pretrained(args.reward_model_path, revision=args.reward_model_revision)
    vocab = lambda t: {token: i for token, i in t.get_vocab().items() if token != "[PAD]"}
    if reward_tokenizer is not None and (vocab(reward_tokenizer) != vocab(tokenizer) or reward_tokenizer.eos_token_id != eos):
        raise ValueError(f"--reward-model-path {args.reward_model_path}: its tokenizer differs from --sft-model-path's "
                         f"({len(reward_tokenizer)} vs {len(tokenizer)} tokens, EOS {reward_tokenizer.eos_token_id} vs "
                         f"{eos}); the reward model must read the policy's token ids")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = find_checkpoint(args, output_dir, world_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")

    # ---- data: left-padded queries [D2.2]; this process's validation prompts, sampled before every rollout ----
    def tokenize_split(rows):  # (N, Q) left-padded query tokens
        return torch.tensor([left_pad(tokenize_query(tokenizer, r, args.query_length), args.query_length, pad) for r in rows])

    train_queries = tokenize_split(dataset["train"])
    validation_rows = dataset["validation"].select(validation_shard)
    validation_queries = tokenize_split(validation_rows).to(device)
    context_length = args.query_length
    if checkpoint is not None:
        run_name = checkpoint["run_name"]
    seed_everything(args.seed + rank * 100003)

    # ---- models: reward and value from the reward model (first: a bad one fails before anything is written),
    # policy and reference from SFT ----
    def prepare(model, frozen):
        """Frozen models in eval mode without gradients; gradient checkpointing on the trained ones if asked. Under
        --fsdp each model is sharded as soon as it is loaded: the four whole 6.9B models would not fit one GPU."""
        if frozen:
            model.eval().requires_grad_(False)
        elif args.gradient_checkpointing:
            getattr(model, "backbone", model).gradient_checkpointing_enable()
        # trained ones: gradients reduce-scattered; bf16 on CUDA: bf16 compute, fp32 reduction and master weights
        model = shard_model(model, args.bf16 and device.type == "cuda") if args.fsdp else model
        if args.compile:  # in place (the state dict keeps its names); dynamic: widths and generation lengths vary
            model.compile(dynamic=True)
        return model

    reward_model = ScalarModel.from_pretrained(args.reward_model_path, args.reward_model_revision, config_without_dropout)
    bias, bias_source = reward_model.bias, "stored" if reward_model.has_stored_bias else "none stored, not computed"
    if checkpoint is not None and "reward_bias" in checkpoint:
        bias, bias_source = checkpoint["reward_bias"], "the resumed run's"
    elif not reward_model.has_stored_bias and args.compute_missing_bias:  # checked and tokenised before anything is written
        bias_source = None
        check_columns(dataset["train"], ["summary"], "--query-dataset (train; its reference summaries set the reward "
                      "model's missing bias [D15]; --no-compute-missing-bias leaves it 0)")
        num_rows = min(args.num_normalization_samples or len(dataset["train"]), len(dataset["train"]))
        rows = dataset["train"].select(range(num_rows))
        norm_queries, norm_responses, norm_dropped = reference_summaries(rows, tokenizer, args.query_length,
                                                                         args.normalization_response_length)
        if not norm_queries:
            raise ValueError(f"--query-dataset {args.query_dataset}: no train reference summary fits "
                             f"--normalization-response-length {args.normalization_response_length}")
    reward_model = prepare(reward_model.to(device), frozen=True)
    value_model = ScalarModel.from_pretrained(args.reward_model_path, args.reward_model_revision, config_without_dropout)
    value_model = prepare(value_model.to(device), frozen=False)
    policy = prepare(load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision), frozen=False)
    ref_policy = prepare(load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision), frozen=True)
    logger = Logger(args, run_name, output_dir, rank, checkpoint)  # the first write into output_dir
    if bias_source is None:  # [D15] as reward_model.py sets it after training; the same value on every process
        bias, stats = normalization_bias(reward_model, norm_queries, norm_responses, pad,
                                         args.query_length + args.normalization_response_length,
                                         args.local_rollout_forward_batch_size, device, rank, world_size, autocast)
        bias_source = (f"computed: mean score of {len(norm_queries)} train reference summaries ({norm_dropped} over "
                       f"--normalization-response-length left out)")
        logger.log({"normalization/bias": bias, **{f"normalization/{k}": v for k, v in stats.items()}}, step=0)
    reward_model.bias = value_model.bias = bias  # every score and the value model's initial outputs are normalised
    print(f"[ppo] rank {rank}: reward model normalisation bias {bias!r} ({bias_source})", flush=True)
    unwrapped = PolicyAndValueWrapper(policy, value_model)
    model = DDP(unwrapped) if world_size > 1 and not args.fsdp else unwrapped
    if args.fsdp:
        held = sum(p.to_local().numel() for p in unwrapped.parameters())  # this process's shards
        print(f"[ppo] rank {rank}: FSDP holds {held} of the {sum(p.numel() for p in unwrapped.parameters())} trained "
              f"parameters", flush=True)
    # one AdamW over policy and value; fused kernel on CUDA (the same update up to rounding)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps, fused=device.type == "cuda")
    first_update, global_step, optimizer_steps, kl_coef = 0, 0, 0, args.kl_coef
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, sharded or not
    if checkpoint is not None:  # resume: weights, AdamW moments, counters and every random stream
        set_state_dict(unwrapped, optimizer, model_state_dict=checkpoint["model"],
                       optim_state_dict=checkpoint["optimizer"], options=full_state)
        first_update, global_step, optimizer_steps = checkpoint["update"], checkpoint["episode"], checkpoint["optimizer_steps"]
        kl_coef = checkpoint["kl_coef"]  # the adaptive controller's coefficient for the next update
        set_rng_states(checkpoint["rng"], rank)
        print(f"[ppo] resumed from update {first_update} of {output_dir}/checkpoints", flush=True)
        del checkpoint

    def write_checkpoint(update):
        model_state, optimizer_state = get_state_dict(unwrapped, optimizer, options=full_state)  # gathers FSDP shards
        state = dict(rng=rng_states(world_size), update=update, episode=global_step, optimizer_steps=optimizer_steps,
                     kl_coef=kl_coef, reward_bias=bias)
        if rank == 0:  # the prompt order is a function of the update counter: it is the data-loader position
            save_checkpoint(output_dir, update, dict(state, model=model_state, optimizer=optimizer_state,
                                                     args=asdict(args), run_name=run_name, **logger.state()),
                            args.keep_checkpoints)

    print(f"[ppo] {num_updates} updates of {args.batch_size} episodes, {args.num_ppo_epochs} epochs x "
          f"{args.num_mini_batches} mini-batches, gradient accumulation {gradient_accumulation_steps}, "
          f"{world_size} process(es), {device}, output {output_dir}", flush=True)

    def whiten(values, mask):  # the advantages' whitening: per process (the reference's) or over all processes
        return global_masked_whiten(values, mask, world_size) if args.global_advantage_whitening else masked_whiten(values, mask)

    start_time, first_step = time.time(), global_step
    for update in range(first_update + 1, num_updates + 1):
        global_step += args.batch_size
        optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / num_updates) * args.lr  # linear decay
        indices = prompt_indices(len(train_queries), args.batch_size, update, rank, world_size, args.seed)
        queries = train_queries[indices].to(device)  # (b, Q)
        timer = {"validation": 0.0, "generation": 0.0, "scoring": 0.0, "training": 0.0}
        model.eval()

        # 0. before the rollout, as the reference: this process's validation prompts sampled at temperature 0.01 and
        # scored (with the rollout's missing-EOS score; deviation: the reference's validation score omits it)
        t0 = time.time()
        with torch.no_grad(), autocast:
            validation_responses, validation_score = rollout_scores(policy, reward_model, validation_queries, tokenizer,
                                                                    args, 0.01)
        if (args.sample_table_every and (update - 1) % args.sample_table_every == 0) or update == num_updates:
            rows = [dict(update=update, episode=global_step - args.batch_size, id=row["id"],
                         query=tokenizer.decode(q, skip_special_tokens=True),
                         response=tokenizer.decode(r, skip_special_tokens=True), reference=row["summary"],
                         score=s.item(), has_eos=bool((r == eos).any()))
                    for row, q, r, s in zip(validation_rows, validation_queries, validation_responses, validation_score)]
            if world_size > 1:  # every process's rows, in rank order
                gathered = [None] * world_size
                dist.all_gather_object(gathered, rows)
                rows = [row for part in gathered for row in part]
            logger.table(f"samples_update_{update}", rows, output_dir)  # episode: what the sampled policy trained on
        timer["validation"] += time.time() - t0

        # ---- rollout, in chunks of local_rollout_forward_batch_size ----
        with torch.no_grad(), autocast:
            query_responses, responses, postprocessed_responses = [], [], []
            logprobs, ref_logprobs, values, scores, sequence_lengths = [], [], [], [], []
            chunks = length_groups(queries, args.local_rollout_forward_batch_size, pad, args.group_by_length)
            for chunk in chunks:
                # the chunk's common left padding is dropped: every forward below sees only columns that hold a token
                # (deviation: the reference's forwards run at the full query width; the same up to float rounding)
                query = trim_left_padding(queries[chunk], pad)  # (c, q), q <= Q
                # 1. sample exactly response_length tokens; old logprobs from the sampling logits [D23.1]
                t0 = time.time()
                query_response, logits = generate(policy, query, pad, args.response_length, args.temperature)
                response = query_response[:, query.size(1):]  # (c, R)
                logprob = logprobs_of(logits, response)
                del logits
                timer["generation"] += time.time() - t0

                # 2. reference logprobs (same temperature) and values of the untruncated response
                t0 = time.time()
                ref_logprob, value = reference_logprobs_and_values(ref_policy, value_model, query_response,
                                                                   args.response_length, pad, args.temperature)

                # 3. truncate after the first EOS [D23.2], score the truncated text, -1 without EOS [D23.3]
                postprocessed_response = truncate_response(eos, pad, response)
                scored = trim_right_padding(torch.cat([query, postprocessed_response], 1), pad)  # read at the EOS
                _, score, _ = get_reward(reward_model, scored, pad, query.size(1))
                if args.missing_eos_score is not None:
                    score = torch.where((postprocessed_response == eos).any(-1), score, args.missing_eos_score)
                sequence_length = first_true_indices(postprocessed_response == pad) - 1  # index of the EOS (or R-1)
                timer["scoring"] += time.time() - t0

                # stored at the common width Q + R (the dropped padding put back), for the update's random micro-batches
                query_response = F.pad(query_response, (context_length - query.size(1), 0), value=pad)
                query_responses.append(query_response)
                responses.append(response)
                postprocessed_responses.append(postprocessed_response)
                logprobs.append(logprob)
                ref_logprobs.append(ref_logprob)
                values.append(value)
                scores.append(score)
                sequence_lengths.append(sequence_length)
            unsort = torch.argsort(torch.cat(chunks))  # back to the order of `queries` (a no-op without grouping)
            query_responses, responses = torch.cat(query_responses)[unsort], torch.cat(responses)[unsort]  # (b, Q + R), (b, R)
            postprocessed_responses = torch.cat(postprocessed_responses)[unsort]
            logprobs, ref_logprobs = torch.cat(logprobs)[unsort].float(), torch.cat(ref_logprobs)[unsort].float()  # (b, R)
            values, scores = torch.cat(values)[unsort].float(), torch.cat(scores)[unsort].float()  # (b, R), (b,)
            sequence_lengths = torch.cat(sequence_lengths)[unsort]  # (b,)
            check_finite("objective/scores", scores, f"update {update}", dict(query_responses=query_responses),
                         output_dir, rank, world_size)

            # 4. masks and rewards: logprobs after the EOS are invalid, values are kept up to EOS+1
            response_idxs = torch.arange(args.response_length, device=device).repeat(local_batch_size, 1)
            padding_mask = response_idxs > sequence_lengths.unsqueeze(1)  # (b, R) true strictly after the EOS
            logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
            ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
            padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)
            values = torch.masked_fill(values, padding_mask_p1, 0)
            rewards, non_score_reward, kl = compute_rewards(scores, logprobs, ref_logprobs, sequence_lengths, kl_coef,
                                                            args.score_at_eos, args.kl_estimator)
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
                rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

            # 5. GAE and advantage whitening (per process as the reference does, or over all processes)
            advantages, returns = compute_advantages(rewards, values, padding_mask, args.gamma, args.lam, whiten)

        # 6. PPO epochs over mini-batches and micro-batches: clipped policy and value losses
        model.train()
        t0 = time.time()
        rollout = dict(query_responses=query_responses, responses=responses, logprobs=logprobs, values=values,
                       advantages=advantages, returns=returns, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)
        stats, steps = ppo_update(model, optimizer, rollout, args, pad, gradient_accumulation_steps, autocast)
        optimizer_steps += steps
        timer["training"] += time.time() - t0
        check_finite("ppo/loss", torch.stack([stats["pg_loss"], stats["vf_loss"]]), f"update {update}",
                     dict(rollout, scores=scores, pg_loss_stats=stats["pg_loss"], vf_loss_stats=stats["vf_loss"]),
                     output_dir, rank, world_size)

        # 7. logging (N+ metric names; the validation score of step 0)
        with torch.no_grad(), autocast:
            mean_kl = kl.sum(1).mean()  # the reward's estimator; 0 after the EOS, where both are INVALID_LOGPROB
            mean_entropy = torch.masked_fill(-logprobs, padding_mask, 0).sum(1).mean()  # valid tokens only (deviation)
            mean_non_score_reward = non_score_reward.sum(1).mean()
            num_eos_tokens = (responses == eos).sum().float()
            if world_size > 1:
                dist.all_reduce(num_eos_tokens)  # summed over processes (deviation: the reference logged rank 0's)
            eps = int((global_step - first_step) / (time.time() - start_time))
            metrics = {
                "objective/kl": gather_mean(mean_kl, world_size).item(),
                "objective/kl_coef": kl_coef,  # the coefficient in this update's rewards
                "objective/entropy": gather_mean(mean_entropy, world_size).item(),
                "objective/non_score_reward": gather_mean(mean_non_score_reward, world_size).item(),
                "objective/rlhf_reward": gather_mean(mean_non_score_reward + scores.mean(), world_size).item(),
                "objective/scores": gather_mean(scores.mean(), world_size).item(),
                "objective/validation_score": gather_mean(validation_score.mean(), world_size).item(),
                "ppo/policy/approxkl_avg": gather_mean(stats["approxkl"].mean(), world_size).item(),
                "ppo/policy/clipfrac_avg": gather_mean(stats["pg_clipfrac"].mean(), world_size).item(),
                "ppo/loss/policy_avg": gather_mean(stats["pg_loss"].mean(), world_size).item(),
                "ppo/loss/value_avg": gather_mean(stats["vf_loss"].mean(), world_size).item(),
                "ppo/val/clipfrac_avg": gather_mean(stats["vf_clipfrac"].mean(), world_size).item(),
                "ppo/policy/entropy_avg": gather_mean(stats["entropy"].mean(), world_size).item(),
                "ppo/val/ratio": gather_mean(stats["ratio"].mean(), world_size).item(),
                "ppo/val/ratio_var": gather_mean(stats["ratio"].var(unbiased=False), world_size).item(),
                "ppo/val/num_eos_tokens": num_eos_tokens.item(),
                "ppo/lr": optimizer.param_groups[0]["lr"],
                "ppo/episode": global_step,
                "ppo/eps": eps,
                "ppo/optimizer_steps": optimizer_steps,
                **{f"time/{k}": v for k, v in timer.items()},
            }
        logger.log(metrics, step=update)
        if args.kl_target is not None:  # the same on every process: objective/kl is the mean over all of them
            kl_coef = adaptive_kl_coef(kl_coef, metrics["objective/kl"], args.kl_target, args.kl_horizon, args.batch_size)
        if rank == 0:
            progress("ppo", update, num_updates, start_time, first_update, episode=global_step, eps=eps,
                     score=metrics["objective/scores"], kl=metrics["objective/kl"],
                     val_score=metrics["objective/validation_score"])
        del validation_responses, validation_score
        del query_responses, responses, postprocessed_responses, logprobs, ref_logprobs, values, scores
        del rewards, non_score_reward, kl, advantages, returns, rollout
        if update == num_updates or (args.checkpoint_every and update % args.checkpoint_every == 0):
            write_checkpoint(update)

    # ---- evaluation at temperature 0.01 on validation and test; reference summaries scored too ----
    if args.run_eval:
        model.eval()
        for split in ["validation", "test"]:
            rows = dataset[split]
            if args.num_eval_samples is not None:
                rows = rows.select(range(min(args.num_eval_samples, len(rows))))
            shard = list(range(rank, len(rows), world_size))  # each process evaluates its share; rank 0 gathers
            # every process runs the same number of forwards (FSDP needs it): the shorter shares repeat a row
            padded = shard + (shard or [0])[-1:] * (math.ceil(len(rows) / world_size) - len(shard))
            eval_queries = tokenize_split(rows.select(padded)).to(device)
            references = [tokenizer.encode(" " + rows[i]["summary"]) + [eos] for i in padded]
            references = torch.tensor([r + [pad] * (max(map(len, references)) - len(r)) for r in references], device=device)
            with torch.no_grad(), autocast:
                eval_responses, eval_scores = rollout_scores(policy, reward_model, eval_queries, tokenizer, args, 0.01)
                reference_scores = []
                for i in range(0, len(references), args.local_rollout_forward_batch_size):
                    chunk = slice(i, i + args.local_rollout_forward_batch_size)
                    eval_query = trim_left_padding(eval_queries[chunk], pad)
                    query_reference = trim_right_padding(torch.cat([eval_query, references[chunk]], 1), pad)
                    reference_scores.append(get_reward(reward_model, query_reference, pad, eval_query.size(1))[1])
                reference_scores = torch.cat(reference_scores)
                table = []
                for j, i in enumerate(shard):
                    response, reference_score = eval_responses[j], reference_scores[j]
                    has_eos = bool((response == eos).any())
                    table.append(dict(
                        id=rows[i]["id"], query=tokenizer.decode(eval_queries[j], skip_special_tokens=True),
                        response=tokenizer.decode(response, skip_special_tokens=True), reference=rows[i]["summary"],
                        score=eval_scores[j].item(), reference_score=reference_score.item(), has_eos=has_eos,
                        response_tokens=int((response != pad).sum()),
                    ))
            if world_size > 1:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, table)
                table = [row for part in gathered for row in part]
            logger.table(f"eval_{split}", table, output_dir)
            logger.log({f"eval/{split}/score": sum(r["score"] for r in table) / len(table),
                        f"eval/{split}/reference_score": sum(r["reference_score"] for r in table) / len(table),
                        f"eval/{split}/eos_rate": sum(r["has_eos"] for r in table) / len(table)}, step=num_updates)

    # ---- save the policy (AutoModelForCausalLM-loadable) and the value model ----
    policy_state = get_model_state_dict(policy, options=full_state)  # whole tensors, also under FSDP (a collective)
    value_state = get_model_state_dict(value_model, options=full_state)
    if rank == 0:
        policy.save_pretrained(output_dir, state_dict=policy_state)
        tokenizer.save_pretrained(output_dir)
        value_model.save_pretrained(os.path.join(output_dir, "value_model"), state_dict=value_state)
        print(f"[ppo] saved the policy to {output_dir} and the value model to {output_dir}/value_model", flush=True)
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
