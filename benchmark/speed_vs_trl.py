# See benchmark/README.md "Speed against TRL" for what is compared, how to read the report and the TRL differences.
"""Throughput and peak memory of ppo_tldr.py against TRL 1.12's PPOTrainer on the offline world, and how
ppo_tldr.py's time per update scales with response length, batch size and model size.

    python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 -r benchmark/requirements.txt
    python benchmark/speed_vs_trl.py --out-dir /tmp/speed --compile         # ~15 min on 2 idle cores
    python benchmark/speed_vs_trl.py --out-dir /tmp/speed --quick                  # tiny world, 1 repeat, minutes

Both sides run as subprocesses with the same threads, world, prompts (tokenised once, here, by ppo_tldr.py's own
helpers), batch sizes, optimizer steps and generated tokens per episode; they alternate (ours, TRL, ours, TRL, ...).
Ours runs through its real command line; TRL runs this file with --trl-worker inside the TRL virtual environment.
Writes {out-dir}/speed.md (printed at the end) and {out-dir}/speed.json (every raw figure).
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --malloc-trim: glibc malloc gives freed memory back at once (large blocks mmap'd, the heap trimmed on every free), so
# that a peak RSS is nearer each side's working set than to how much freed heap its allocation pattern leaves behind.
MALLOC_TRIM = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
TRL_VERSION = "1.12.0"
# A third model size for the scaling table only (offline_world.py holds tiny and small); few posts, built in seconds.
EXTRA_SIZES = {"medium": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                              sft_splits=(2_000, 64, 64), preference_splits=(64, 16, 8))}


# ------------------------------------------------------------ pure helpers ------------------------------------
def steady_eps(update_times, batch_size, warmup=1):
    """Episodes per second over the updates after the first `warmup` ones: `update_times[k]` is the wall time at
    which update k+1 finished, so the window starts when the last warm-up update ended."""
    if len(update_times) < warmup + 1:
        raise ValueError(f"need at least {warmup + 1} updates to measure past {warmup} warm-up update(s), got {len(update_times)}")
    return (len(update_times) - warmup) * batch_size / (update_times[-1] - update_times[warmup - 1])


def median_ratio(ours, theirs):
    """Median over the alternated pairs of ours[i] / theirs[i]."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"need as many runs of each side (>= 1), got {len(ours)} and {len(theirs)}")
    return statistics.median(a / b for a, b in zip(ours, theirs))


def shares(parts, total):
    """{name: part / total} plus "other" = what the named parts do not cover."""
    out = {k: v / total for k, v in parts.items()}
    out["other"] = 1.0 - sum(out.values())
    return out


def same_build(ours, theirs):
    """The differences (a list of strings) between two sides' library builds: torch version and build (the local part,
    e.g. +cpu or +cu130, and its CUDA version) and transformers version. Empty when they match."""
    return [f"{k}: ours {ours.get(k)!r}, TRL {theirs.get(k)!r}" for k in ("torch", "torch_cuda", "transformers")
            if ours.get(k) != theirs.get(k)]


def forward_flops_per_token(matmul_parameters):
    """Model FLOPs of one token's forward pass: 2 per weight of every matrix product (a multiply and an add); the
    attention scores and everything that is not a weight matrix are left out, as in Kaplan et al. 2020's 2N."""
    return 2 * matmul_parameters


def phase_flops(c, policy_parameters, scalar_parameters):
    """Model FLOPs per PPO update of each phase, counted on the padded width (query_length + response_length tokens per
    episode) that both sides process: generation = the policy's forward over every token (prefill + one step per
    sampled token with a KV cache); scoring = the forwards of the reference policy, the value model and the reward
    model; training = forward + backward (3x a forward) of policy and value model per epoch."""
    tokens = c["batch_size"] * (c["query_length"] + c["response_length"])
    policy, scalar = forward_flops_per_token(policy_parameters), forward_flops_per_token(scalar_parameters)
    return dict(generation=tokens * policy, scoring=tokens * (policy + 2 * scalar),
                training=c["num_ppo_epochs"] * tokens * 3 * (policy + scalar))


def config_key(c):
    return (c["size"], c["response_length"], c["batch_size"], c["local_micro_batch_size"],
            c["local_rollout_forward_batch_size"], c["query_length"], c["updates"], c["threads"])


# ------------------------------------------------------------ the TRL side ------------------------------------
def trl_worker(config_path):
    """Runs inside the TRL virtual environment: TRL's PPOTrainer on the prepared prompts with the same settings as
    ours; writes per-update wall times, the generation/scoring/training split and the generated lengths."""
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    with open(config_path) as f:
        c = json.load(f)
    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"the TRL side needs trl=={TRL_VERSION}, this environment has {trl.__version__}")
    torch.set_num_threads(c["threads"])
    tokenizer = AutoTokenizer.from_pretrained(c["base_model"], padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # the same [PAD] id as ppo_tldr.py's load_tokenizer
    assert tokenizer.pad_token_id == c["pad_token_id"], (tokenizer.pad_token_id, c["pad_token_id"])
    with open(c["queries"]) as f:
        queries = json.load(f)["queries"]  # left-padded to query_length by ppo_tldr.py's helpers
    dataset = Dataset.from_dict({"input_ids": queries})
    policy = AutoModelForCausalLM.from_pretrained(c["base_model"])
    ref_policy = AutoModelForCausalLM.from_pretrained(c["base_model"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(c["reward_model"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(c["reward_model"], num_labels=1)
    config = PPOConfig(
        output_dir=c["run_dir"], seed=1, use_cpu=c.get("use_cpu", True), bf16=c.get("bf16", False),  # gpu_check.py: GPU, bf16 report_to="none", save_strategy="no",
        disable_tqdm=True, num_sample_generations=0, learning_rate=c["lr"], adam_epsilon=c["eps"],
        total_episodes=c["updates"] * c["batch_size"],
        per_device_train_batch_size=c["local_micro_batch_size"],
        gradient_accumulation_steps=c["batch_size"] // c["local_micro_batch_size"],  # one optimizer step per epoch
        num_mini_batches=1, num_ppo_epochs=c["num_ppo_epochs"],
        local_rollout_forward_batch_size=c["local_rollout_forward_batch_size"],
        response_length=c["response_length"], temperature=0.7, kl_coef=0.05, vf_coef=0.1, cliprange=0.2,
        cliprange_value=0.2, gamma=1.0, lam=0.95, missing_eos_penalty=1.0,
        stop_token="eos",  # truncation after the first EOS and the EOS check, as ours
    )

    # Time generation and rollout scoring by wrapping the module's own functions; training runs from the first
    # forward with gradients to the end of the update.
    timer = {"generation": 0.0, "scoring": 0.0, "train_start": None}
    generated_lengths = []
    original_generate, original_forward, original_get_reward = trl_ppo.generate, trl_ppo.forward, trl_ppo.get_reward

    def timed_generate(lm_backbone, queries, pad_token_id, generation_config):
        t0 = time.time()
        query_response, logits = original_generate(lm_backbone, queries, pad_token_id, generation_config)
        timer["generation"] += time.time() - t0
        generated_lengths.append(query_response.size(1) - queries.size(1))
        return query_response, logits

    def timed(fn):
        def wrapper(*a, **k):
            if torch.is_grad_enabled():
                if timer["train_start"] is None:
                    timer["train_start"] = time.time()
                return fn(*a, **k)
            t0 = time.time()
            out = fn(*a, **k)
            timer["scoring"] += time.time() - t0
            return out
        return wrapper

    trl_ppo.generate, trl_ppo.forward, trl_ppo.get_reward = timed_generate, timed(original_forward), timed(original_get_reward)
    records = []

    class UpdateTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            records.append(dict(update=state.global_step, episode=state.episode, time=now,
                                generation=timer["generation"], scoring=timer["scoring"],
                                training=now - timer["train_start"], generated_lengths=list(generated_lengths)))
            timer.update(generation=0.0, scoring=0.0, train_start=None)
            generated_lengths.clear()

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         eval_dataset=dataset.select(range(c["local_rollout_forward_batch_size"])),
                         callbacks=[UpdateTimes()])
    # Equal generated tokens: TRL wrote the EOS into the policy's generation config (so generate() would stop once
    # every sequence of a chunk has one); without it, sampling runs the full response_length, while TRL still
    # truncates after the first EOS through its own stop_token_id. Checked below on every generated chunk.
    trainer.policy_model.generation_config.eos_token_id = None
    trainer.train()
    bad = [n for r in records for n in r["generated_lengths"] if n != c["response_length"]]
    if bad:
        raise SystemExit(f"TRL generated {bad[:5]} tokens in some chunks instead of {c['response_length']}")
    with open(os.path.join(c["run_dir"], "trl_updates.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------ preparing a world --------------------------------
def prepare_world(size, root):
    """The offline world of `size` (built once under `root`) plus a sequence-classification reward model (scalar
    head initialised as value_head's [D11]) that both sides load as reward model and value-model init."""
    import datasets
    import offline_world
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    import value_head

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # the reward model's new head is expected, not news
    world = os.path.join(root, f"world_{size}")
    reward_model = os.path.join(world, "reward_seqcls")
    if not os.path.exists(os.path.join(world, "world.json")):
        if size in EXTRA_SIZES and size not in offline_world.SIZES:
            offline_world.SIZES[size] = offline_world.Size(**EXTRA_SIZES[size])  # this process only
        offline_world.build(world, size=size, seed=1, verbose=False)
    if not os.path.exists(os.path.join(reward_model, "config.json")):
        torch.manual_seed(1)
        base_model = os.path.join(world, "base_model")
        classifier = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
        classifier.score.weight.data.copy_(value_head.scalar_head(classifier.config.hidden_size).weight.data)
        classifier.save_pretrained(reward_model)
        value_head.ScalarModel.from_pretrained(reward_model)  # ours loads it too
    with open(os.path.join(world, "world.json")) as f:
        parameters = json.load(f)["parameters"]
    return dict(world=world, base_model=os.path.join(world, "base_model"), reward_model=reward_model,
                query_dataset=os.path.join(world, "tldr_sft"), parameters=parameters)


def prepare_queries(w, query_length, path):
    """The train queries exactly as ppo_tldr.py builds them (its own helpers): formatted, cut at the last newline
    while too long [D2.2], left-padded with [PAD] to query_length. Returns the pad id."""
    if not os.path.exists(path):
        from datasets import load_dataset

        import ppo_tldr

        tokenizer = ppo_tldr.load_tokenizer(w["base_model"], "--sft-model-path")
        rows = load_dataset(w["query_dataset"])["train"]
        queries = ppo_tldr.left_padded_queries(tokenizer, rows.to_list(), query_length).tolist()
        with open(path, "w") as f:
            json.dump(dict(pad_token_id=tokenizer.pad_token_id, queries=queries), f)
    with open(path) as f:
        return json.load(f)["pad_token_id"]


# ------------------------------------------------------------ running and measuring ----------------------------
# Runs a command and writes its max RSS (KiB) to argv[1]. Linux floors a process's max RSS at the RSS high-water mark
# of the process that exec'd it (the memory it replaced), so a run started straight from this process (hundreds of
# MiB: torch, worlds, models) would report at least this process's peak. Started from this small launcher, a run's
# floor is the launcher's own few MiB, far below any run's.
MEASURE = ("import os, subprocess, sys\n"
           "proc = subprocess.Popen(sys.argv[2:])\n"
           "_, status, rusage = os.wait4(proc.pid, 0)\n"
           "open(sys.argv[1], 'w').write(str(rusage.ru_maxrss))\n"
           "code = os.waitstatus_to_exitcode(status)\n"
           "sys.exit(code if code >= 0 else 128 - code)")


def run_measured(cmd, env, log_path):
    """Run `cmd`, stdout and stderr into `log_path`, and return (exit code, peak RSS in MiB, [(time, line)]).
    The peak is the run's own max RSS (wait4 in the MEASURE launcher), so runs see neither each other's peaks nor
    this process's."""
    lines = []
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    maxrss_path = log_path + ".maxrss"
    if os.path.exists(maxrss_path):
        os.remove(maxrss_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, maxrss_path, *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
        for line in proc.stdout:
            lines.append((time.time(), line))
            log.write(line)
        proc.wait()
    if not os.path.exists(maxrss_path):
        return proc.returncode, float("nan"), lines  # the launcher itself failed: the lines say why
    with open(maxrss_path) as f:
        return proc.returncode, int(f.read()) / 1024, lines  # ru_maxrss is in KiB on Linux


def import_baseline_mib(python, statement, threads, log_path):
    """Max RSS of a process that only imports a side's libraries: the part of the peak that is not the run's."""
    rc, peak_mib, lines = run_measured([python, "-c", statement], thread_env(threads), log_path)
    if rc != 0:
        raise SystemExit(f"{python} -c {statement!r} failed:\n{''.join(l for _, l in lines[-20:])}")
    return peak_mib


# Run by each side's python: the versions and builds of its libraries (compared before any run).
ENVIRONMENT = ("import json, platform, torch, transformers; print(json.dumps(dict(python=platform.python_version(), "
               "torch=torch.__version__, torch_cuda=torch.version.cuda, transformers=transformers.__version__)))")
# The machine's fp32 matrix-product rate with the runs' threads: the best of several large products.
MATMUL_PEAK = ("import json, sys, time, torch; torch.set_num_threads(int(sys.argv[1])); n = int(sys.argv[2]); "
               "a, b = torch.randn(n, n), torch.randn(n, n); a @ b; best = 0.0\n"
               "for _ in range(8):\n    t0 = time.perf_counter(); a @ b; best = max(best, 2 * n**3 / (time.perf_counter() - t0))\n"
               "print(json.dumps(dict(n=n, flops=best)))")


def library_builds(python, threads):
    result = subprocess.run([python, "-c", ENVIRONMENT], capture_output=True, text=True, env=thread_env(threads))
    if result.returncode != 0:
        raise SystemExit(f"{python} cannot import torch and transformers:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def matmul_peak_flops(threads, n=2048):
    """fp32 FLOP/s of a large torch.matmul (n x n by n x n, 2 n^3 FLOPs), best of 8, in a process of its own."""
    result = subprocess.run([sys.executable, "-c", MATMUL_PEAK, str(threads), str(n)], capture_output=True, text=True,
                            env=thread_env(threads), check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["flops"]


def matmul_parameters(base_model):
    """(policy, scalar model) weights that enter matrix products: every parameter but the input embedding table (a
    lookup); the scalar model has the backbone without the LM head, plus its head of hidden_size weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model)
    total = sum(p.numel() for p in model.parameters())
    embed_in, embed_out = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    return total - embed_in, total - embed_in - embed_out + model.config.hidden_size


def thread_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def run_ours(c, w, run_dir, compile=False):
    """ppo_tldr.py through its command line; `compile` adds --compile (its compile time is in the first, warm-up
    update, reported as first_update_seconds)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run refuses a folder with checkpoints: start afresh
    cmd = [sys.executable, "ppo_tldr.py", "--sft-model-path", w["base_model"], "--reward-model-path", w["reward_model"],
           "--query-dataset", w["query_dataset"], "--query-length", c["query_length"],
           "--response-length", c["response_length"], "--total-episodes", c["updates"] * c["batch_size"],
           "--batch-size", c["batch_size"], "--num-mini-batches", 1, "--num-ppo-epochs", c["num_ppo_epochs"],
           "--local-micro-batch-size", c["local_micro_batch_size"],
           "--local-rollout-forward-batch-size", c["local_rollout_forward_batch_size"],
           "--lr", c["lr"], "--eps", c["eps"], "--no-run-eval", "--no-compute-missing-bias", "--output-dir", run_dir]  # as TRL: no normalisation pass
    cmd = [str(x) for x in cmd] + (["--compile"] if compile else [])
    rc, peak_mib, lines = run_measured(cmd, thread_env(c["threads"]), os.path.join(run_dir + ".log"))
    if rc != 0:
        raise SystemExit(f"ppo_tldr.py failed (exit {rc}); see {run_dir}.log\n{''.join(l for _, l in lines[-20:])}")
    update_times = [t for t, line in lines if line.startswith("[ppo] ") and "/" in line.split()[1]]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if '"ppo/episode"' in line]
    assert len(update_times) == len(metrics) == c["updates"], (len(update_times), len(metrics), c["updates"])
    steady = metrics[1:]
    wall = (update_times[-1] - update_times[0]) / len(steady)
    parts = {k: statistics.mean(m[f"time/{k}"] for m in steady) for k in ("generation", "scoring", "training")}
    first = sum(metrics[0][f"time/{k}"] for k in ("generation", "scoring", "training"))
    return dict(side="ours_compiled" if compile else "ours", command=shlex.join(cmd),
                eps=steady_eps(update_times, c["batch_size"]), peak_mib=peak_mib, first_update_seconds=first,
                seconds_per_update=wall, parts=parts, shares=shares(parts, wall),
                optimizer_steps=metrics[-1]["ppo/optimizer_steps"], generated_tokens_per_episode=c["response_length"])


def run_trl(c, w, run_dir, trl_python, pad_token_id, queries_path):
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    worker_config = os.path.join(run_dir, "worker.json")
    with open(worker_config, "w") as f:
        json.dump(dict(c, base_model=w["base_model"], reward_model=w["reward_model"], run_dir=run_dir,
                       queries=queries_path, pad_token_id=pad_token_id), f)
    cmd = [trl_python, os.path.abspath(__file__), "--trl-worker", worker_config]
    rc, peak_mib, lines = run_measured(cmd, thread_env(c["threads"]), run_dir + ".log")
    if rc != 0:
        raise SystemExit(f"the TRL worker failed (exit {rc}); see {run_dir}.log\n{''.join(l for _, l in lines[-20:])}")
    with open(os.path.join(run_dir, "trl_updates.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == c["updates"], (len(records), c["updates"])
    steady = records[1:]
    wall = (records[-1]["time"] - records[0]["time"]) / len(steady)
    parts = {k: statistics.mean(r[k] for r in steady) for k in ("generation", "scoring", "training")}
    return dict(side="trl", command=shlex.join(cmd), eps=steady_eps([r["time"] for r in records], c["batch_size"]),
                peak_mib=peak_mib, seconds_per_update=wall, parts=parts, shares=shares(parts, wall),
                optimizer_steps=c["updates"] * c["num_ppo_epochs"],
                generated_tokens_per_episode=sorted({n for r in records for n in r["generated_lengths"]}))


# ------------------------------------------------------------ the report ---------------------------------------
def fmt_shares(s):
    return " / ".join(f"{100 * s[k]:.0f}%" for k in ("generation", "scoring", "training", "other"))


SIDE_NAMES = {"ours": "ours", "ours_compiled": "ours --compile", "trl": "TRL"}


def flops_table(comp, peak):
    """Per phase: model FLOPs per update, and each side's achieved FLOP/s (median over repeats) against `peak`."""
    sides = [s for s in ("ours", "ours_compiled", "trl") if comp.get(s)]
    rows = ["| phase | model GFLOP per update | " + " | ".join(f"{SIDE_NAMES[s]} GFLOP/s | {SIDE_NAMES[s]} % of peak"
                                                      for s in sides) + " |", "|---|---|" + "---|---|" * len(sides)]
    for phase, flops in comp["flops"].items():
        rates = [statistics.median(flops / r["parts"][phase] for r in comp[side]) for side in sides]
        rows.append(f"| {phase} | {flops / 1e9:.1f} | " + " | ".join(f"{r / 1e9:.2f} | {100 * r / peak:.1f}%"
                                                                   for r in rates) + " |")
    return rows


def verdict(eps_ratio, memory_ratio):
    return "meets" if eps_ratio >= 1.5 and memory_ratio <= 1.0 else "misses"


def report(header, comparisons, scaling, baselines, builds=None, peak=None):
    out = [f"# ppo_tldr.py against TRL {TRL_VERSION} PPOTrainer", "", *header, ""]
    if builds:
        out += [f"Libraries: ours torch {builds['ours']['torch']} (CUDA {builds['ours']['torch_cuda']}), transformers "
                f"{builds['ours']['transformers']}; TRL side torch {builds['trl']['torch']} (CUDA "
                f"{builds['trl']['torch_cuda']}), transformers {builds['trl']['transformers']}"
                + ("." if not same_build(builds["ours"], builds["trl"]) else " (MISMATCHED: --allow-mismatched-builds)."), ""]
    if peak:
        out += [f"Machine limit: a 2048 x 2048 fp32 torch.matmul runs at {peak / 1e9:.1f} GFLOP/s with "
                "these threads (best of 8). Model FLOPs per phase: 2 per weight of every matrix product per token for a "
                "forward (embedding lookup and attention scores left out), 3x that for forward + backward; counted on "
                "the padded width query + response; generation = the policy over every token, scoring = reference, "
                "value and reward model, training = policy and value model per epoch.", ""]
    out += [
           f"Max RSS of a process that only imports each side's libraries: ours {baselines['ours']:.0f} MiB "
           f"(`import ppo_tldr`), TRL {baselines['trl']:.0f} MiB (`from trl.experimental.ppo import PPOTrainer`); "
           "\"above imports\" = peak minus that.", ""]
    for comp in comparisons:
        c = comp["config"]
        out += [f"## {c['size']} world ({comp['parameters']:,} parameters per model)", "",
                f"query {c['query_length']} tokens, response {c['response_length']} tokens (both sides, every episode), "
                f"batch {c['batch_size']} episodes per update, micro-batch {c['local_micro_batch_size']}, rollout "
                f"chunk {c['local_rollout_forward_batch_size']}, {c['num_ppo_epochs']} epochs x 1 mini-batch = "
                f"{c['num_ppo_epochs']} optimizer steps per update, {c['updates']} updates (the first is warm-up), "
                f"{c['threads']} threads.", "",
                "| repeat | ours eps | TRL eps | eps ours/TRL | ours peak MiB | TRL peak MiB | memory ours/TRL | "
                "ours above imports | TRL above imports | ours s/update | TRL s/update | ours gen/score/train/other | "
                "TRL gen/score/train/other |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, (a, b) in enumerate(zip(comp["ours"], comp["trl"]), 1):
            out.append(f"| {i} | {a['eps']:.1f} | {b['eps']:.1f} | {a['eps'] / b['eps']:.2f} | {a['peak_mib']:.0f} | "
                       f"{b['peak_mib']:.0f} | {a['peak_mib'] / b['peak_mib']:.2f} | {a['peak_mib'] - baselines['ours']:.0f} | "
                       f"{b['peak_mib'] - baselines['trl']:.0f} | {a['seconds_per_update']:.2f} | "
                       f"{b['seconds_per_update']:.2f} | {fmt_shares(a['shares'])} | {fmt_shares(b['shares'])} |")
        out += ["", f"**Median ratio ours/TRL: episodes per second {comp['eps_ratio']:.2f}x, peak memory "
                    f"{comp['memory_ratio']:.2f}x** ({verdict(comp['eps_ratio'], comp['memory_ratio'])} the goal of "
                    ">= 1.5x the episodes per second at no more peak memory).", ""]
        if comp.get("ours_compiled"):
            out += ["With `--compile` (torch.compile of the four models' forwards, dynamic shapes; warm: the eps "
                    "exclude the first update, which compiles; compile time = its first update minus the first "
                    "update of the run without --compile in the same repeat):", "",
                    "| repeat | ours --compile eps | TRL eps | eps ours/TRL | peak MiB | memory ours/TRL | "
                    "first update s | compile time s | s/update | gen/score/train/other |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for i, (a, u, b) in enumerate(zip(comp["ours_compiled"], comp["ours"], comp["trl"]), 1):
                out.append(f"| {i} | {a['eps']:.1f} | {b['eps']:.1f} | {a['eps'] / b['eps']:.2f} | {a['peak_mib']:.0f} | "
                           f"{a['peak_mib'] / b['peak_mib']:.2f} | {a['first_update_seconds']:.1f} | "
                           f"{a['first_update_seconds'] - u['first_update_seconds']:.1f} | "
                           f"{a['seconds_per_update']:.2f} | {fmt_shares(a['shares'])} |")
            out += ["", f"**Median ratio ours --compile/TRL: episodes per second {comp['compiled_eps_ratio']:.2f}x, peak "
                        f"memory {comp['compiled_memory_ratio']:.2f}x** ({verdict(comp['compiled_eps_ratio'], comp['compiled_memory_ratio'])} "
                        "the goal).", ""]
        if peak and "flops" in comp:
            out += [*flops_table(comp, peak), ""]
    if scaling:
        out += ["## ppo_tldr.py alone: time per update", "",
                "Each row changes one setting from the base configuration (marked *); shares are of the wall time "
                "per update; other = the per-update validation sample at temperature 0.01 (N+), GAE, logging.", "",
                "| varied | size | response tokens | batch | s/update | eps | peak MiB | generation | scoring | "
                "training | other |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in scaling:
            c, r = row["config"], row["result"]
            s = r["shares"]
            out.append(f"| {row['varied']}{' *' if row['base'] else ''} | {c['size']} | {c['response_length']} | "
                       f"{c['batch_size']} | {r['seconds_per_update']:.2f} | {r['eps']:.1f} | {r['peak_mib']:.0f} | "
                       f"{100 * s['generation']:.0f}% | {100 * s['scoring']:.0f}% | {100 * s['training']:.0f}% | "
                       f"{100 * s['other']:.0f}% |")
        out.append("")
    return "\n".join(out)


def machine_header(argv, threads):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    load = open("/proc/loadavg").read().split()[:3]
    return [f"Command: `{shlex.join(['python'] + argv)}`", "",
            f"Machine: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}; load average at start {' '.join(load)}; {threads} threads per run"
            + "".join(f", {k}={os.environ[k]}" for k in MALLOC_TRIM if k in os.environ) + "; "
            f"date {time.strftime('%Y-%m-%d %H:%M:%S')}.",
            "", "eps = episodes per second over the updates after the first (warm-up); peak = the process's max "
            "RSS (wait4 from a small launcher), whole process (Python, libraries, data, four models, optimizer)."]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", help="folder for speed.md, speed.json, the worlds and the runs")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], help="worlds compared with TRL")
    parser.add_argument("--repeats", type=int, default=2, help="ours/TRL pairs per size, alternated A B A B")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (OMP_NUM_THREADS)")
    parser.add_argument("--updates", type=int, default=5, help="PPO updates per run; the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes per update")
    parser.add_argument("--local-micro-batch-size", type=int, default=16, help="episodes per forward/backward")
    parser.add_argument("--local-rollout-forward-batch-size", type=int, default=32, help="queries per generation chunk")
    parser.add_argument("--response-length", type=int, default=53, help="generated tokens per episode")
    parser.add_argument("--query-length", type=int, default=128, help="query tokens (left-padded)")
    parser.add_argument("--scaling-size", default="tiny", help="world of the response-length and batch-size rows")
    parser.add_argument("--scaling-response-lengths", type=int, nargs="*", default=[16, 53, 106])
    parser.add_argument("--scaling-batch-sizes", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--scaling-sizes", nargs="*", default=["tiny", "small", "medium"], help="model-size rows")
    parser.add_argument("--quick", action="store_true", help="tiny world, 1 repeat, 3 updates, two-point scaling")
    parser.add_argument("--compile", action="store_true",
                        help="also run ours with --compile in every repeat (ours, ours --compile, TRL); warm figures")
    parser.add_argument("--trl-python", default=os.path.join(REPO, ".venv-trl", "bin", "python"),
                        help=f"python of a virtual environment with trl=={TRL_VERSION} (benchmark/requirements.txt)")
    parser.add_argument("--allow-mismatched-builds", action="store_true",
                        help="compare even when the two sides' torch/transformers versions or builds differ")
    parser.add_argument("--malloc-trim", action="store_true",
                        help="every run with " + " ".join(f"{k}={v}" for k, v in MALLOC_TRIM.items()) +
                        " (glibc returns freed memory at once: peaks nearer the working sets)")
    parser.add_argument("--trl-worker", metavar="CONFIG", help=argparse.SUPPRESS)  # internal: the TRL side
    cli = parser.parse_args()
    if cli.trl_worker:
        return trl_worker(cli.trl_worker)
    if not cli.out_dir:
        parser.error("--out-dir is required")
    if cli.quick:
        cli.sizes, cli.repeats, cli.updates = ["tiny"], 1, 3
        cli.scaling_response_lengths, cli.scaling_batch_sizes, cli.scaling_sizes = [16, 53], [32, 64], ["tiny", "small"]
    if cli.updates < 2:
        parser.error("--updates must be >= 2 (the first update is warm-up)")
    check = subprocess.run([cli.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True) \
        if os.path.exists(cli.trl_python) else None
    if check is None or check.stdout.strip() != TRL_VERSION:
        raise SystemExit(f"--trl-python {cli.trl_python} must have trl=={TRL_VERSION}: python -m venv .venv-trl && "
                         f".venv-trl/bin/pip install torch==2.13.0 -r benchmark/requirements.txt")
    builds = {"ours": library_builds(sys.executable, cli.threads), "trl": library_builds(cli.trl_python, cli.threads)}
    mismatch = same_build(builds["ours"], builds["trl"])
    if mismatch and not cli.allow_mismatched_builds:
        raise SystemExit("the two sides run different library builds, so their speed and memory are not comparable ("
                         + "; ".join(mismatch) + f"): install the same torch build into {cli.trl_python}'s environment "
                         "(e.g. the same version pin first), or pass --allow-mismatched-builds")
    if cli.malloc_trim:
        os.environ.update(MALLOC_TRIM)  # every run's environment comes from thread_env, a copy of os.environ
    out_dir = os.path.abspath(cli.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sys.path[:0] = [REPO, os.path.join(REPO, "benchmark")]
    header = machine_header(sys.argv, cli.threads)
    base = dict(response_length=cli.response_length, batch_size=cli.batch_size, query_length=cli.query_length,
                local_micro_batch_size=cli.local_micro_batch_size, updates=cli.updates, threads=cli.threads,
                local_rollout_forward_batch_size=cli.local_rollout_forward_batch_size, num_ppo_epochs=4,
                lr=1e-5, eps=1e-5)
    worlds, ours_runs, counter = {}, {}, [0]

    def world(size):
        if size not in worlds:
            worlds[size] = prepare_world(size, out_dir)
        return worlds[size]

    def queries_for(c):
        path = os.path.join(out_dir, f"queries_{c['size']}_{c['query_length']}.json")
        return prepare_queries(world(c["size"]), c["query_length"], path), path

    def ours(c, compile=False):
        counter[0] += 1
        name = "ours_compiled" if compile else "ours"
        print(f"[speed] {SIDE_NAMES[name]}, {c['size']}, response {c['response_length']}, batch {c['batch_size']}", flush=True)
        result = run_ours(c, world(c["size"]), os.path.join(out_dir, "runs", f"{counter[0]:02d}_{name}_{c['size']}"),
                          compile)
        if not compile:  # the scaling rows are of the default settings
            ours_runs.setdefault(config_key(c), []).append(result)
        print(f"[speed]   {result['eps']:.1f} eps, {result['peak_mib']:.0f} MiB", flush=True)
        return result

    def trl(c):
        counter[0] += 1
        print(f"[speed] TRL, {c['size']}, response {c['response_length']}, batch {c['batch_size']}", flush=True)
        pad_token_id, path = queries_for(c)
        result = run_trl(c, world(c["size"]), os.path.join(out_dir, "runs", f"{counter[0]:02d}_trl_{c['size']}"),
                         cli.trl_python, pad_token_id, path)
        print(f"[speed]   {result['eps']:.1f} eps, {result['peak_mib']:.0f} MiB", flush=True)
        return result

    baselines = {"ours": import_baseline_mib(sys.executable, "import ppo_tldr", cli.threads,
                                             os.path.join(out_dir, "runs", "imports_ours.log")),
                 "trl": import_baseline_mib(cli.trl_python, "from trl.experimental.ppo import PPOTrainer", cli.threads,
                                            os.path.join(out_dir, "runs", "imports_trl.log"))}
    peak = matmul_peak_flops(cli.threads)
    print(f"[speed] fp32 matmul peak {peak / 1e9:.1f} GFLOP/s with {cli.threads} threads", flush=True)
    comparisons = []
    for size in cli.sizes:
        c = dict(base, size=size)
        queries_for(c)
        policy_parameters, scalar_parameters = matmul_parameters(world(size)["base_model"])
        comp = dict(config=c, parameters=world(size)["parameters"], ours=[], ours_compiled=[], trl=[],
                    matmul_parameters=dict(policy=policy_parameters, scalar=scalar_parameters),
                    flops=phase_flops(c, policy_parameters, scalar_parameters))
        for _ in range(cli.repeats):  # A B A B (A C B ...): slow drifts of the machine hit every side alike
            comp["ours"].append(ours(c))
            if cli.compile:
                comp["ours_compiled"].append(ours(c, compile=True))
            comp["trl"].append(trl(c))
        comp["eps_ratio"] = median_ratio([r["eps"] for r in comp["ours"]], [r["eps"] for r in comp["trl"]])
        comp["memory_ratio"] = median_ratio([r["peak_mib"] for r in comp["ours"]], [r["peak_mib"] for r in comp["trl"]])
        if cli.compile:
            comp["compiled_eps_ratio"] = median_ratio([r["eps"] for r in comp["ours_compiled"]], [r["eps"] for r in comp["trl"]])
            comp["compiled_memory_ratio"] = median_ratio([r["peak_mib"] for r in comp["ours_compiled"]],
                                                         [r["peak_mib"] for r in comp["trl"]])
        comparisons.append(comp)

    scaling = []
    rows = [("response length", dict(base, size=cli.scaling_size, response_length=n)) for n in cli.scaling_response_lengths]
    rows += [("batch size", dict(base, size=cli.scaling_size, batch_size=n)) for n in cli.scaling_batch_sizes]
    rows += [("model size", dict(base, size=s)) for s in cli.scaling_sizes]
    for varied, c in rows:
        runs = ours_runs.get(config_key(c)) or [ours(c)]  # reuses the comparison runs where the setting is the same
        result = min(runs, key=lambda r: abs(r["eps"] - statistics.median(x["eps"] for x in runs)))  # the median run
        scaling.append(dict(varied=varied, config=c, result=result, base=config_key(c) == config_key(dict(base, size=cli.scaling_size))))

    header[2] += f" Load average at the end {' '.join(open('/proc/loadavg').read().split()[:3])}."
    markdown = report(header, comparisons, scaling, baselines, builds, peak)
    with open(os.path.join(out_dir, "speed.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(out_dir, "speed.json"), "w") as f:
        json.dump(dict(header=header, trl_version=TRL_VERSION, library_builds=builds, matmul_peak_flops=peak,
                       import_baseline_mib=baselines, comparisons=comparisons, scaling=scaling), f, indent=2)
    print(markdown)


if __name__ == "__main__":
    main()
