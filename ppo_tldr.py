# See README.md "ppo_tldr.py" for the list of N+ details, the deviations from the reference and the benchmarks.
"""PPO for TL;DR summarisation, faithful to the N+ reference (Huang et al. 2024, arXiv 2403.17031).

One GPU (1B; the paper's 512 episodes per update through gradient accumulation): `python ppo_tldr.py`; eight GPUs
(the paper's set-up): `torchrun --nproc-per-node 8 ppo_tldr.py`. The tiny offline world (CPU, about a minute; see
benchmark/README.md "The tiny offline TL;DR world"); its random base model stands in for the SFT policy:
    python benchmark/offline_world.py --out-dir world --size tiny
    python reward_model.py --sft-model-path world/base_model --label-dataset world/tldr_preference \\
        --query-dataset world/tldr_sft --query-length 128 --lr 3e-4 --batch-size 32 --output-dir world/reward_model
    python ppo_tldr.py --sft-model-path world/base_model --reward-model-path world/reward_model \\
        --query-dataset world/tldr_sft --query-length 128 --total-episodes 256 --batch-size 32 \\
        --local-micro-batch-size 16 --local-rollout-forward-batch-size 32 --lr 1e-4
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

from value_head import ScalarModel, get_reward

INVALID_LOGPROB = 1.0  # log-prob written at positions after the EOS, so that the per-token KL there is 0 [PPO.eos_mask]


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
    """hub branch, tag or commit of --sft-model-path (e.g. a release's run); None: main; not for a folder"""
    reward_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"
    """the reward model (value_head folder, the reference's ScalarModel or a 1-label classifier); also the value model"""
    reward_model_revision: Optional[str] = None
    """hub branch, tag or commit of --reward-model-path (e.g. a release's run); None: main; not for a folder"""
    query_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """TL;DR posts: train for rollouts (and a missing bias), validation per update, validation and test at the end"""
    query_dataset_revision: Optional[str] = None
    """hub branch, tag or commit of --query-dataset; None: main; not for a folder"""
    query_length: int = 512
    """query length in tokens; longer posts are cut at their last newline [D2.2], shorter ones left-padded"""
    response_length: int = 53
    """tokens sampled per response; sampling never stops early [D23.1]"""
    compute_missing_bias: bool = True
    """a reward model without a stored normalisation bias gets it at start as reward_model.py sets it [D15]; off: 0"""
    num_normalization_samples: Optional[int] = None
    """train reference summaries (the first ones) scored for a missing bias; None: all (reward_model.py's default)"""
    normalization_response_length: int = 169
    """reward_model.py's --response-length for a missing bias: longer summaries (tokens, EOS included) are left out"""
    # ---- batch sizes ----
    total_episodes: int = 1_000_000
    """episodes (sampled responses) to train on; updates = total_episodes // batch_size"""
    batch_size: int = 512
    """episodes per PPO update over all devices (the algorithm's knob; independent of the number of devices)"""
    num_mini_batches: int = 1
    """mini-batches per PPO epoch (one optimizer step each)"""
    local_micro_batch_size: int = 16
    """episodes per device per forward/backward; gradient accumulation = batch_size / mini-batches / (this x devices)"""
    local_rollout_forward_batch_size: int = 64
    """queries per device per generation/scoring chunk (bounds the memory of rollouts and evaluation)"""
    # ---- optimisation ----
    lr: float = 3e-6
    """learning rate, decayed linearly to 0 over the updates [PPO.lr_decay]"""
    eps: float = 1e-5
    """AdamW epsilon"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of policy and value model (for large models)"""
    fsdp: bool = False
    """shard the models, gradients and AdamW states over the processes (FSDP2) instead of DDP: 2.8B, 6.9B; torchrun"""
    # ---- PPO ----
    num_ppo_epochs: int = 4
    """passes over each batch of episodes [PPO.epochs]"""
    temperature: float = 0.7
    """sampling temperature; every forward's logits are divided by it too [PPO.temperature]"""
    kl_coef: float = 0.05
    """coefficient of the per-token KL penalty [PPO.kl_penalty] (fixed, as the reference's; initial under --kl-target)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL in the reward and objective/kl: k1 = log pi - log ref (the reference's); k3 = (r - 1) - log r"""
    kl_target: Optional[float] = None
    """target KL per response (nats) of the adaptive KL controller (Ziegler et al. 2019); None: a fixed --kl-coef"""
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
    """whiten the per-token rewards before GAE [PPO.reward_whitening] (off in the reference)"""
    global_advantage_whitening: bool = False
    """whiten the advantages with the statistics of every process's episodes; off: per process, as the reference"""
    score_at_eos: bool = False
    """add the score at the EOS token; off (the reference's placement): one position after it [PPO.score_placement]"""
    local_eval_batch_size: int = 2
    """validation prompts per process sampled at temperature 0.01 before every rollout (objective/validation_score)"""
    sample_table_every: int = 220
    """save that sample as a table at updates 1, 1 + N, 1 + 2N, ... and (deviation) at the last; 0: the last only"""
    num_eval_samples: Optional[int] = None
    """posts of each of validation and test evaluated after training (None: all)"""
    group_by_length: bool = False
    """sort the rollout queries by length into chunks (less padding; other random draws per prompt, same law)"""
    compile: bool = False
    """torch.compile the four models' forwards (dynamic shapes); the first update's time/* include compiling"""


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


def trim_left_padding(tokens, pad_token_id):
    """`tokens` (B, T) less its all-pad leading columns (one kept); same outputs: positions come from the mask."""
    start = min(int(first_true_indices((tokens != pad_token_id).any(0, keepdim=True))), tokens.size(1) - 1)
    return tokens[:, start:]


def trim_right_padding(tokens, pad_token_id):
    """`tokens` (B, T) less its all-pad trailing columns (one kept), which a causal model's outputs do not see."""
    holds_a_token = (tokens != pad_token_id).any(0, keepdim=True).flip(1)
    return tokens[:, : max(tokens.size(1) - int(first_true_indices(holds_a_token)), 1)]


def length_groups(queries, chunk_size, pad_token_id, group_by_length):
    """Row indices of each rollout chunk: in order, or under `group_by_length` sorted (stably) by query token count."""
    order = torch.arange(queries.size(0), device=queries.device)
    if group_by_length:
        order = torch.sort((queries != pad_token_id).sum(1), stable=True).indices
    return list(order.split(chunk_size))


def left_padded_queries(tokenizer, rows, query_length):
    """(N, Q) token ids of the rows' queries [D2.2], left-padded."""
    pad = tokenizer.pad_token_id
    return torch.tensor([left_pad(q, query_length, pad) for q in tokenize_queries(tokenizer, rows, query_length)])


def masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_whiten(values, mask, shift_mean=True, world_size=1):
    """(values - mean) / sqrt(var + 1e-8), the mean and biased variance over the valid positions (of every process's
    `values` when world_size > 1); the mean is added back unless `shift_mean`."""
    sums = torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)])
    if world_size > 1:
        dist.all_reduce(sums)
    mean = sums[0] / sums[1]
    squares = ((values - mean) ** 2 * mask).sum()
    if world_size > 1:
        dist.all_reduce(squares)
    whitened = (values - mean) * torch.rsqrt(squares / sums[1] + 1e-8)
    return whitened if shift_mean else whitened + mean


def per_token_kl(logprobs, ref_logprobs, estimator="k1"):
    """Per-token KL (B, R) (Schulman 2020): k1 = log pi - log ref; k3 = (r - 1) - log r, r = ref / pi; 0 after EOS."""
    if estimator not in ("k1", "k3"):
        raise ValueError(f"--kl-estimator must be k1 or k3, got {estimator!r}")
    log_ratio = ref_logprobs - logprobs  # log r
    return logprobs - ref_logprobs if estimator == "k1" else torch.expm1(log_ratio) - log_ratio


def compute_rewards(scores, logprobs, ref_logprobs, sequence_lengths, kl_coef, score_at_eos=False, kl_estimator="k1"):
    """(rewards, non_score_reward, kl), each (B, R): the KL penalty at every token plus the score one position after the
    EOS (at the EOS when it is the last token or there is none; always at the EOS with `score_at_eos`)."""
    kl = per_token_kl(logprobs, ref_logprobs, kl_estimator)
    non_score_reward = -kl_coef * kl  # [PPO.kl_penalty]
    rewards = non_score_reward.clone()
    sequence_lengths_p1 = sequence_lengths if score_at_eos else sequence_lengths + 1
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[torch.arange(rewards.size(0), device=rewards.device), actual_end] += scores  # [PPO.score_placement]
    return rewards, non_score_reward, kl


def adaptive_kl_coef(kl_coef, kl, target, horizon, batch_size):
    """The adaptive controller's next KL coefficient (Ziegler et al. 2019, sec. 2.2): proportional control of the batch's
    mean summed per-response KL towards `target`, the error clipped to +-20%, over `horizon` episodes."""
    proportional_error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + proportional_error * batch_size / horizon)


def compute_advantages(rewards, values, padding_mask, gamma, lam, world_size=1):
    """GAE (Schulman et al. 2016, eq. 16), returns = advantages + values; the advantages whitened, 0 at padding."""
    lastgaelam, advantages_reversed, gen_length = 0, [], rewards.size(1)
    for t in reversed(range(gen_length)):  # [PPO.gae]
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, R)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask, world_size=world_size)  # [PPO.advantage_whitening]
    return torch.masked_fill(advantages, padding_mask, 0), returns


def logprobs_of(logits, tokens):
    """Log-probabilities (B, R) of `tokens` (B, R) under `logits` (B, R, V) (already divided by the temperature)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def reference_logprobs_and_values(ref_policy, value_model, query_responses, response_length, pad_token_id, temperature):
    """The reference policy's log-probabilities of the R response tokens [PPO.temperature] and the values of the state
    before each, (B, R) each, read at the last positions of (B, q + R) query-responses (any query width q)."""
    ref_logits = forward(ref_policy, query_responses, pad_token_id, logits_to_keep=response_length + 1).logits[:, :-1]
    ref_logprobs = logprobs_of(ref_logits / (temperature + 1e-7), query_responses[:, -response_length:])
    del ref_logits
    full_values, _, _ = get_reward(value_model, query_responses, pad_token_id, query_responses.size(1) - response_length)
    return ref_logprobs, full_values[:, -response_length - 1 : -1]


def truncate_and_score(reward_model, query, response, tokenizer, missing_eos_score):
    """(postprocessed_response, score): `response` (c, R) truncated after its first EOS [D23.2], query + truncated text
    scored at its EOS; a response without EOS gets `missing_eos_score` [D23.3] (None: the reward model's score)."""
    postprocessed_response = truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id, response)
    scored = trim_right_padding(torch.cat([query, postprocessed_response], 1), tokenizer.pad_token_id)
    _, score, _ = get_reward(reward_model, scored, tokenizer.pad_token_id, query.size(1))
    if missing_eos_score is not None:
        score = torch.where((postprocessed_response == tokenizer.eos_token_id).any(-1), score, missing_eos_score)
    return postprocessed_response, score


@torch.no_grad()
def sample_table(policy, reward_model, rows, tokenizer, args, device):
    """A row per post: the response at temperature 0.01 and the reference summary [D3], scored as in the rollout."""
    pad, eos, size, parts = tokenizer.pad_token_id, tokenizer.eos_token_id, args.local_rollout_forward_batch_size, []
    queries = left_padded_queries(tokenizer, rows, args.query_length).to(device)  # (N, Q)
    for i in range(0, len(rows), size):
        query = trim_left_padding(queries[i : i + size], pad)
        references = [tokenizer.encode(" " + rows[j]["summary"]) + [eos] for j in range(i, min(i + size, len(rows)))]
        references = torch.tensor([right_pad(r, max(map(len, references)), pad) for r in references], device=device)
        query_response, _ = generate(policy, query, pad, args.response_length, 0.01)
        response, score = truncate_and_score(reward_model, query, query_response[:, query.size(1):], tokenizer,
                                             args.missing_eos_score)
        parts.append((response, score, truncate_and_score(reward_model, query, references, tokenizer, None)[1]))
    responses, scores, reference_scores = [torch.cat(p) for p in zip(*parts)]
    return [dict(id=row["id"], query=tokenizer.decode(q, skip_special_tokens=True),
                 response=tokenizer.decode(r, skip_special_tokens=True), reference=row["summary"], score=s.item(),
                 reference_score=s_ref.item(), has_eos=bool((r == eos).any()), response_tokens=int((r != pad).sum()))
            for row, q, r, s, s_ref in zip(rows, queries, responses, scores, reference_scores)]


@torch.no_grad()
def normalization_bias(reward_model, rows, tokenizer, args, device, rank, world_size):
    """(bias, stats, how) as reward_model.py sets them [D15] from the reference summaries of `rows`; each process scores
    its share in as many forwards as the others (FSDP) and gets every score in the same order, hence the same bias."""
    check_columns(rows, ["summary"], "--query-dataset (train; its reference summaries set the missing reward bias)")
    rows = rows.select(range(min(args.num_normalization_samples or len(rows), len(rows))))
    queries, responses, dropped = reference_summaries(rows, tokenizer, args.query_length, args.normalization_response_length)
    if not queries:
        raise ValueError(f"--query-dataset {args.query_dataset}: no train reference summary fits "
                         f"--normalization-response-length {args.normalization_response_length}")
    share, scores = list(range(rank, len(queries), world_size)), []
    for idxs, keep in eval_chunks(share, args.local_rollout_forward_batch_size, math.ceil(len(queries) / world_size), 0):
        batch = [right_pad(queries[i] + responses[i], args.query_length + args.normalization_response_length,
                           tokenizer.pad_token_id) for i in idxs]
        _, score, _ = get_reward(reward_model, torch.tensor(batch, device=device), tokenizer.pad_token_id, 0)
        scores += score.float().tolist() if keep else []
    bias, stats = normalization_stats(gather_rows(scores, world_size))
    return bias, stats, (f"computed: mean score of {len(queries)} train reference summaries ({dropped} over "
                         f"--normalization-response-length left out)")


def validation_indices(num_rows, local_eval_batch_size, rank, world_size):
    """This process's validation rows, the same at every update: [rank * N, (rank + 1) * N) for N =
    local_eval_batch_size, as the reference's unshuffled validation loader, sharded by batches, read from its start."""
    if local_eval_batch_size < 1 or local_eval_batch_size * world_size > num_rows:
        raise ValueError(f"--local-eval-batch-size {local_eval_batch_size} x {world_size} process(es) must be "
                         f"between 1 and the {num_rows} rows of the validation split")
    return list(range(rank * local_eval_batch_size, (rank + 1) * local_eval_batch_size))


def check_inputs(args, world_size):
    """Every argument, the data and the reward model's tokenizer, checked before any model loads."""
    positive, non_negative = "positive", ">= 0 (0: at the end only)"
    rules = dict(response_length=positive, keep_checkpoints=positive, kl_target=positive, kl_horizon=positive,
                 num_eval_samples=positive, checkpoint_every=non_negative, sample_table_every=non_negative)
    for name, rule in rules.items():  # None: unset
        value = getattr(args, name)
        if value is not None and (value < 0 or value == 0 and rule == positive):
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if args.total_episodes < args.batch_size:
        raise ValueError(f"--total-episodes {args.total_episodes} is smaller than one --batch-size {args.batch_size}")
    if args.fsdp and world_size == 1:
        raise ValueError("--fsdp shards the models over processes: launch with torchrun --nproc-per-node N (N > 1)")
    local_batch_size = exact_div(args.batch_size, world_size, "--batch-size over the number of processes")
    per_process = "per-process batch (--batch-size / processes) over --"
    local_mini_batch_size = exact_div(local_batch_size, args.num_mini_batches, per_process + "num-mini-batches")
    gradient_accumulation_steps = exact_div(local_mini_batch_size, args.local_micro_batch_size,
                                            "per-process mini-batch over --local-micro-batch-size")
    exact_div(local_batch_size, args.local_rollout_forward_batch_size, per_process + "local-rollout-forward-batch-size")
    check_model_path(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    check_model_path(args.reward_model_path, "--reward-model-path", args.reward_model_revision)
    dataset = load_data(args.query_dataset, "--query-dataset", revision=args.query_dataset_revision)
    for split in ["train", "validation"] + (["test"] if args.run_eval else []):
        if split not in dataset or len(dataset[split]) == 0:
            problem = "is empty" if split in dataset else f"is missing (it has {list(dataset)})"
            raise ValueError(f"--query-dataset {args.query_dataset}: the {split!r} split {problem}")
        check_columns(dataset[split], ["id", "subreddit", "title", "post"] + (["summary"] if split != "train" else []),
                      f"--query-dataset ({split})")
    if len(dataset["train"]) < args.batch_size:
        raise ValueError(f"--query-dataset train: {len(dataset['train'])} posts, fewer than one --batch-size {args.batch_size}")
    tokenizer = load_tokenizer(args.sft_model_path, "--sft-model-path", args.sft_model_revision)
    if cached_file(args.reward_model_path, "tokenizer_config.json", revision=args.reward_model_revision,
                   _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False):
        # the reward model reads the policy's token ids; [PAD] left out (the hub's has none; pad never reaches a model)
        reward_tokenizer = AutoTokenizer.from_pretrained(args.reward_model_path, revision=args.reward_model_revision)
        vocab = lambda t: {token: i for token, i in t.get_vocab().items() if token != "[PAD]"}
        if vocab(reward_tokenizer) != vocab(tokenizer) or reward_tokenizer.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(f"--reward-model-path {args.reward_model_path}: its tokenizer differs from "
                             f"--sft-model-path's ({len(reward_tokenizer)} vs {len(tokenizer)} tokens, EOS "
                             f"{reward_tokenizer.eos_token_id} vs {tokenizer.eos_token_id}); the reward model must "
                             f"read the policy's token ids")
    else:
        print(f"[ppo] --reward-model-path {args.reward_model_path} holds no tokenizer: it cannot be checked against "
              f"the policy's, so it is taken to be the same", flush=True)
    return dataset, tokenizer, gradient_accumulation_steps, args.total_episodes // args.batch_size


class PolicyAndValueWrapper(torch.nn.Module):
    """Separate policy and value networks [PPO.separate_value] as one module: one optimizer and one DDP over both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.policy(**kwargs, use_cache=use_cache, logits_to_keep=logits_to_keep), self.value_model(**kwargs)


def ppo_update(model, optimizer, rollout, args, pad_token_id, gradient_accumulation_steps, autocast):
    """6. Epochs over this process's `rollout` (query_responses (b, Q + R), the rest (b, R)) [PPO.epochs]; returns the
    statistics, each (epochs, mini-batches, micro-batches), and the number of optimizer steps."""
    local_batch_size, response_length = rollout["responses"].shape
    local_mini_batch_size = local_batch_size // args.num_mini_batches
    sharded = [m for m in model.children() if isinstance(m, FSDPModule)]  # policy and value model under --fsdp
    optimizer_steps, stats = 0, []
    for ppo_epoch_idx in range(args.num_ppo_epochs):
        b_inds = torch.randperm(local_batch_size)
        for mini_batch_start in range(0, local_batch_size, local_mini_batch_size):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + local_mini_batch_size]
            for micro_batch_start in range(0, local_mini_batch_size, args.local_micro_batch_size):
                mb = {k: v[mini_batch_inds[micro_batch_start : micro_batch_start + args.local_micro_batch_size]]
                      for k, v in rollout.items()}
                last = micro_batch_start + args.local_micro_batch_size == local_mini_batch_size
                no_sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
                for m in sharded:  # FSDP: the same, by switching the reduce-scatter off
                    m.set_requires_gradient_sync(last)
                with no_sync, autocast:  # the micro-batch's common left padding dropped; responses read from the end
                    output, vpred_temp = forward(model, trim_left_padding(mb["query_responses"], pad_token_id),
                                                 pad_token_id, logits_to_keep=response_length + 1)
                    logits = output.logits[:, :-1].float() / (args.temperature + 1e-7)  # [PPO.temperature]
                    new_logprobs = logprobs_of(logits, mb["responses"])
                    new_logprobs = torch.masked_fill(new_logprobs, mb["padding_mask"], INVALID_LOGPROB)  # [PPO.eos_mask]
                    vpred = torch.masked_fill(vpred_temp[:, -response_length - 1 : -1].float(), mb["padding_mask_p1"], 0)
                    # [PPO.value_loss] clipped around the rollout's values
                    low, high = mb["values"] - args.cliprange_value, mb["values"] + args.cliprange_value
                    vf_losses1 = torch.square(vpred - mb["returns"])
                    vf_losses2 = torch.square(torch.clamp(vpred, low, high) - mb["returns"])
                    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~mb["padding_mask_p1"])
                    # [PPO.policy_loss] the clipped surrogate objective (Schulman et al. 2017, eq. 7)
                    logprobs_diff = new_logprobs - mb["logprobs"]
                    ratio = torch.exp(logprobs_diff)
                    pg_losses = -mb["advantages"] * ratio
                    pg_losses2 = -mb["advantages"] * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
                    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~mb["padding_mask"])
                    loss = pg_loss + args.vf_coef * vf_loss  # no entropy bonus
                    assert loss.dim() == 0
                    (loss / gradient_accumulation_steps).backward()
                if last:
                    optimizer.step()
                    optimizer.zero_grad()
                    optimizer_steps += 1
                with torch.no_grad():  # statistics over valid tokens only (deviation: the reference's were unmasked)
                    valid = ~mb["padding_mask"]
                    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(F.softmax(logits, dim=-1) * logits, dim=-1)
                    stats.append(dict(
                        approxkl=0.5 * masked_mean(logprobs_diff**2, valid), pg_loss=pg_loss.detach(),
                        pg_clipfrac=masked_mean((pg_losses2 > pg_losses).float(), valid), vf_loss=vf_loss.detach(),
                        vf_clipfrac=masked_mean((vf_losses2 > vf_losses1).float(), ~mb["padding_mask_p1"]),
                        entropy=masked_mean(entropy, valid), ratio=masked_mean(ratio, valid)))
                del output, vpred_temp, logits, new_logprobs, loss
    shape = (args.num_ppo_epochs, args.num_mini_batches, gradient_accumulation_steps)
    return {k: torch.stack([s[k] for s in stats]).reshape(shape) for k in stats[0]}, optimizer_steps


def main(args):
    rank, world_size, device = init_distributed()
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.tf32 else "ieee"  # CUDA matmuls; no convolutions here
    dataset, tokenizer, gradient_accumulation_steps, num_updates = check_inputs(args, world_size)  # before any model
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    validation_rows = dataset["validation"].select(validation_indices(len(dataset["validation"]),
                                                                      args.local_eval_batch_size, rank, world_size))
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = find_checkpoint(args, output_dir, world_size)
    run_name = run_name if checkpoint is None else checkpoint["run_name"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    train_queries = left_padded_queries(tokenizer, dataset["train"].to_list(), args.query_length)  # (N, Q)
    seed_everything(args.seed + rank * 100003)

    # ---- models: reward and value model from the reward model (first: a bad one fails before any write), policies ----
    def setup_model(model, trained):  # eval mode (the loop sets the modes); gradients and checkpointing if trained
        model.eval().requires_grad_(trained)
        if trained and args.gradient_checkpointing:
            getattr(model, "backbone", model).gradient_checkpointing_enable()
        if args.fsdp:  # bf16 on CUDA: bf16 compute, fp32 gradient reduction and master weights
            model = shard_model(model, args.bf16 and device.type == "cuda")
        if args.compile:  # in place (the state dict keeps its names); dynamic: widths and generation lengths vary
            model.compile(dynamic=True)
        return model

    reward_source = (args.reward_model_path, args.reward_model_revision, config_without_dropout)
    reward_model = setup_model(ScalarModel.from_pretrained(*reward_source).to(device), trained=False)
    bias, bias_stats = reward_model.bias, None
    bias_source = "stored" if reward_model.has_stored_bias else "none stored, not computed"
    if checkpoint is not None and "reward_bias" in checkpoint:
        bias, bias_source = checkpoint["reward_bias"], "the resumed run's"
    elif not reward_model.has_stored_bias and args.compute_missing_bias:  # [D15] as reward_model.py sets it
        with autocast:
            bias, bias_stats, bias_source = normalization_bias(reward_model, dataset["train"], tokenizer, args, device,
                                                               rank, world_size)
    value_model = setup_model(ScalarModel.from_pretrained(*reward_source).to(device), trained=True)  # [PPO.value_init]
    policy = setup_model(load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision), trained=True)
    ref_policy = setup_model(load_policy(args.sft_model_path, tokenizer, device, args.sft_model_revision), trained=False)
    reward_model.bias = value_model.bias = bias  # every score and the value model's initial outputs are normalised
    print(f"[ppo] rank {rank}: reward model normalisation bias {bias!r} ({bias_source})", flush=True)
    logger = Logger(args, run_name, output_dir, rank, checkpoint)  # the first write into output_dir
    if bias_stats is not None:
        logger.log({"normalization/bias": bias, **{f"normalization/{k}": v for k, v in bias_stats.items()}}, step=0)
    unwrapped = PolicyAndValueWrapper(policy, value_model)
    model = DDP(unwrapped) if world_size > 1 and not args.fsdp else unwrapped
    if args.fsdp:
        print(f"[ppo] rank {rank}: FSDP holds {sum(p.to_local().numel() for p in unwrapped.parameters())} of the "
              f"{sum(p.numel() for p in unwrapped.parameters())} trained parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps, fused=device.type == "cuda")

    # ---- resume: weights, AdamW moments, counters and every random stream, as the checkpoints hold them ----
    first_update, episode, optimizer_steps, kl_coef = 0, 0, 0, args.kl_coef
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, sharded or not
    if checkpoint is not None:
        set_state_dict(unwrapped, optimizer, model_state_dict=checkpoint["model"],
                       optim_state_dict=checkpoint["optimizer"], options=full_state)
        first_update, episode, optimizer_steps, kl_coef = (checkpoint[k] for k in ("update", "episode",
                                                                                   "optimizer_steps", "kl_coef"))
        set_rng_states(checkpoint["rng"], rank)
        print(f"[ppo] resumed from update {first_update} of {output_dir}/checkpoints", flush=True)
        del checkpoint

    def write_checkpoint(update):  # the prompt order is a function of the update counter: the data-loader position
        model_state, optimizer_state = get_state_dict(unwrapped, optimizer, options=full_state)  # gathers FSDP shards
        state = dict(rng=rng_states(world_size), update=update, episode=episode, optimizer_steps=optimizer_steps,
                     kl_coef=kl_coef, reward_bias=bias, model=model_state, optimizer=optimizer_state)
        if rank == 0:
            save_checkpoint(output_dir, update, dict(state, args=asdict(args), run_name=run_name, **logger.state()),
                            args.keep_checkpoints)

    print(f"[ppo] {num_updates} updates of {args.batch_size} episodes, {args.num_ppo_epochs} epochs x "
          f"{args.num_mini_batches} mini-batches, gradient accumulation {gradient_accumulation_steps}, "
          f"{world_size} process(es), {device}, output {output_dir}", flush=True)
    start_time, first_episode = time.time(), episode
    for update in range(first_update + 1, num_updates + 1):
        episode += args.batch_size
        optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / num_updates) * args.lr  # [PPO.lr_decay]
        indices = rank_batch_indices(len(train_queries), args.batch_size, update - 1, rank, world_size, args.seed)
        queries = train_queries[indices].to(device)  # (b, Q), reshuffled after each pass over the data [D21]
        timer = dict(validation=0.0, generation=0.0, scoring=0.0, training=0.0)  # seconds
        model.eval()

        # the validation sample, before the rollout as in the reference: this process's validation prompts at
        # temperature 0.01, scored with the missing-EOS score (deviation: the reference's validation score omits it)
        t0 = time.time()
        with autocast:
            samples = sample_table(policy, reward_model, validation_rows, tokenizer, args, device)
        validation_score = torch.tensor([row["score"] for row in samples], device=device)
        if (args.sample_table_every and (update - 1) % args.sample_table_every == 0) or update == num_updates:
            samples = [dict(update=update, episode=episode - args.batch_size, **row) for row in samples]  # trained on
            logger.table(f"samples_update_{update}", gather_rows(samples, world_size), output_dir)
        timer["validation"] += time.time() - t0

        # the rollout, in chunks of --local-rollout-forward-batch-size queries, each without its common left padding
        # (deviation: the reference's forwards run at the full query width; the same up to float rounding)
        with torch.no_grad(), autocast:
            chunks, parts = length_groups(queries, args.local_rollout_forward_batch_size, pad, args.group_by_length), []
            for chunk in chunks:
                query = trim_left_padding(queries[chunk], pad)  # (c, q), q <= Q
                # 1. generate: exactly response_length tokens [D23.1]; old logprobs from the sampling logits
                t0 = time.time()
                query_response, logits = generate(policy, query, pad, args.response_length, args.temperature)
                response = query_response[:, query.size(1):]  # (c, R)
                logprob = logprobs_of(logits, response)  # [PPO.temperature]
                del logits
                timer["generation"] += time.time() - t0
                # 2. logprobs of the reference policy and values, of the untruncated response
                t0 = time.time()
                ref_logprob, value = reference_logprobs_and_values(ref_policy, value_model, query_response,
                                                                   args.response_length, pad, args.temperature)
                # 3. truncate after the first EOS [D23.2] and score; -1 without an EOS [D23.3]
                postprocessed_response, score = truncate_and_score(reward_model, query, response, tokenizer,
                                                                   args.missing_eos_score)
                timer["scoring"] += time.time() - t0
                query_response = F.pad(query_response, (args.query_length - query.size(1), 0), value=pad)  # (c, Q + R)
                parts.append((query_response, response, postprocessed_response, logprob, ref_logprob, value.float(),
                              score.float()))
            unsort = torch.argsort(torch.cat(chunks))  # back to the order of `queries` (a no-op without grouping)
            query_responses, responses, postprocessed_responses, logprobs, ref_logprobs, values, scores = (
                torch.cat(p)[unsort] for p in zip(*parts))  # (b, Q + R), (b, R) ..., (b,)
            check_finite("objective/scores", scores, f"update {update}", dict(query_responses=query_responses),
                         output_dir, rank, world_size)

            # 4. rewards: log-probs after the EOS invalid, values kept up to EOS+1 [PPO.eos_mask]; KL penalty + score
            sequence_lengths = first_true_indices(postprocessed_responses == pad) - 1  # (b,) the EOS's index (or R-1)
            response_idxs = torch.arange(args.response_length, device=device)
            padding_mask = response_idxs > sequence_lengths.unsqueeze(1)  # (b, R) true strictly after the EOS
            padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)
            logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
            ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
            values = torch.masked_fill(values, padding_mask_p1, 0)
            rewards, non_score_reward, kl = compute_rewards(scores, logprobs, ref_logprobs, sequence_lengths, kl_coef,
                                                            args.score_at_eos, args.kl_estimator)
            if args.whiten_rewards:  # [PPO.reward_whitening]
                rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
                rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

            # 5. GAE and advantage whitening (per process as the reference does, or over all processes)
            advantages, returns = compute_advantages(rewards, values, padding_mask, args.gamma, args.lam,
                                                     world_size if args.global_advantage_whitening else 1)

        # 6. PPO epochs: clipped policy and value losses over mini-batches of micro-batches
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

        # 7. log: the reference's metric names, means over all processes
        num_eos_tokens = (responses == eos).sum().float()
        if world_size > 1:
            dist.all_reduce(num_eos_tokens)  # summed over processes (deviation: the reference logged rank 0's)
        metrics = {name: gather_mean(value, world_size).item() for name, value in {
            "objective/kl": kl.sum(1).mean(),  # the reward's estimator; 0 after the EOS
            "objective/entropy": torch.masked_fill(-logprobs, padding_mask, 0).sum(1).mean(),  # valid tokens (deviation)
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": non_score_reward.sum(1).mean() + scores.mean(),
            "objective/scores": scores.mean(),
            "objective/validation_score": validation_score.mean(),
            **{f"ppo/{name}": stats[key].mean() for name, key in [
                ("policy/approxkl_avg", "approxkl"), ("policy/clipfrac_avg", "pg_clipfrac"), ("loss/policy_avg", "pg_loss"),
                ("loss/value_avg", "vf_loss"), ("val/clipfrac_avg", "vf_clipfrac"), ("policy/entropy_avg", "entropy"),
                ("val/ratio", "ratio")]},
            "ppo/val/ratio_var": stats["ratio"].var(unbiased=False),
        }.items()}
        episodes_per_second = int((episode - first_episode) / (time.time() - start_time))
        metrics.update({"objective/kl_coef": kl_coef, "ppo/val/num_eos_tokens": num_eos_tokens.item(),
                        "ppo/lr": optimizer.param_groups[0]["lr"], "ppo/episode": episode, "ppo/eps": episodes_per_second,
                        "ppo/optimizer_steps": optimizer_steps, **{f"time/{k}": v for k, v in timer.items()}})
        logger.log(metrics, step=update)
        if args.kl_target is not None:  # the same on every process: objective/kl is the mean over all of them
            kl_coef = adaptive_kl_coef(kl_coef, metrics["objective/kl"], args.kl_target, args.kl_horizon, args.batch_size)
        if rank == 0:
            progress("ppo", update, num_updates, start_time, first_update, episode=episode,
                     episodes_per_second=episodes_per_second, score=metrics["objective/scores"],
                     kl=metrics["objective/kl"], val_score=metrics["objective/validation_score"])
        if update == num_updates or (args.checkpoint_every and update % args.checkpoint_every == 0):
            write_checkpoint(update)

    # ---- evaluation at temperature 0.01 on validation and test, each process on a contiguous share; every process runs
    # as many forwards (FSDP): a shorter share repeats a post, whose row is dropped ----
    model.eval()
    for split in ["validation", "test"] if args.run_eval else []:
        rows = dataset[split].select(range(min(args.num_eval_samples or len(dataset[split]), len(dataset[split]))))
        share = math.ceil(len(rows) / world_size)
        shard = list(range(rank * share, min((rank + 1) * share, len(rows))))
        rows = rows.select(shard + [shard[-1] if shard else 0] * (share - len(shard)))  # gathered in dataset order
        with autocast:
            table = sample_table(policy, reward_model, rows, tokenizer, args, device)
        table = gather_rows(table[: len(shard)], world_size)
        logger.table(f"eval_{split}", table, output_dir)
        logger.log({f"eval/{split}/{name}": sum(r[column] for r in table) / len(table) for name, column in
                    [("score", "score"), ("reference_score", "reference_score"), ("eos_rate", "has_eos")]},
                   step=num_updates)

    # ---- save the policy (AutoModelForCausalLM-loadable) and the value model ----
    policy_state = get_model_state_dict(policy, options=full_state)  # whole tensors, also under FSDP (a collective)
    value_state = get_model_state_dict(value_model, options=full_state)
    if rank == 0:
        policy.save_pretrained(output_dir, state_dict=policy_state)
        tokenizer.save_pretrained(output_dir)
        value_model.save_pretrained(os.path.join(output_dir, "value_model"), state_dict=value_state)
        print(f"[ppo] saved the policy to {output_dir} and the value model to {output_dir}/value_model", flush=True)
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
