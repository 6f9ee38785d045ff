# See benchmark/README.md "GPU check" for what this measures and how to read it.
"""One command for a machine with one CUDA GPU: the four scripts at the paper's shapes, measured, offline.

    python benchmark/gpu_check.py --out-dir /tmp/gpu_check           # one CUDA GPU, about 5-8 minutes
    python benchmark/gpu_check.py --out-dir /tmp/gpu_check --tiny    # the same code on CPU in seconds (tests)

Builds, without any download, random-weight GPT-NeoX models of the exact Pythia-1B configuration and a word-level
tokenizer of Pythia's shape (50,277 tokens, `<|endoftext|>` at 0; the scripts add [PAD] at 50,277), and TL;DR-schema
data from benchmark/offline_world.py's generators with posts long enough to fill the 512-token query. Then runs,
through their command lines, bf16 on: ppo_tldr.py at the reference's per-GPU settings (query 512, response 53,
64 episodes per update, micro-batch 16, rollout chunk 64, 4 epochs) for a few updates, and sft.py, reward_model.py,
dpo.py for a few updates at theirs; and TRL 1.12's PPOTrainer on the same models and batch when `trl` imports.
Writes {out-dir}/gpu_check.json and gpu_check.md (printed at the end).

Per stage: sequences (episodes) per second and tokens per second over the updates after the first (warm-up),
peak GPU memory (torch.cuda.max_memory_allocated and max_memory_reserved of the script's process, read at its exit
by a wrapper around the script; on CPU the process's max RSS), PPO's time split from its metrics.jsonl, and the
model FLOPs utilisation: FLOPs = 2 N per token for a forward and 6 N per token for a forward and backward, N = the
model's parameters except the input embedding (a lookup; the output and scalar heads are matrix products and are
counted), attention-score FLOPs not counted; tokens = sequences x (query + response length) as configured; divided
by the time and by the GPU's dense bf16 peak (a table of known GPUs, or --peak-tflops).
"""

import argparse
import importlib.util
import json
import os
import platform
import random
import runpy
import shlex
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import offline_world  # noqa: E402
import speed_vs_trl  # noqa: E402

# The exact Pythia-1B configuration (EleutherAI/pythia-1b-deduped config.json) and Pythia's tokenizer size.
PYTHIA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192,
                 rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, vocab_size=50304,
                 tie_word_embeddings=False, max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu",
                 bos_token_id=0, eos_token_id=0)
TINY = dict(PYTHIA_1B, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            vocab_size=512)
TOKENIZER_SIZE = {"pythia": 50277, "tiny": 400}  # before [PAD]
# Dense bf16 peak TFLOP/s by GPU name (vendor data sheets; SXM/NVL forms where both exist).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.0, "GH200": 989.0, "B200": 2250.0}
# Per-GPU settings of the reference (the paper's 8-GPU runs, one GPU's share), and the tiny ones.
STAGES = {
    "full": dict(query_length=512, ppo=dict(response_length=53, batch_size=64, micro=16, chunk=64, epochs=4, updates=4),
                 sft=dict(response_length=53, batch_size=16, micro=16, updates=5),
                 reward_model=dict(response_length=169, batch_size=8, micro=8, updates=5),
                 dpo=dict(response_length=169, batch_size=8, micro=8, updates=5), post_words=700),
    "tiny": dict(query_length=64, ppo=dict(response_length=8, batch_size=8, micro=4, chunk=8, epochs=2, updates=3),
                 sft=dict(response_length=16, batch_size=8, micro=4, updates=3),
                 reward_model=dict(response_length=48, batch_size=8, micro=4, updates=3),
                 dpo=dict(response_length=48, batch_size=8, micro=4, updates=3), post_words=0),
}


# ------------------------------------------------------------ pure helpers ------------------------------------
def peak_tflops(gpu_name, override=None):
    """The dense bf16 peak of `gpu_name` from PEAK_TFLOPS (longest matching key), or `override`; None if unknown."""
    if override is not None:
        return override
    matches = [k for k in PEAK_TFLOPS if k.lower() in gpu_name.lower()]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def flops(n_params, tokens, backward):
    """Model FLOPs of `tokens` tokens through a model of `n_params` parameters: 2 N per token forward, 6 N with the
    backward pass."""
    return (6 if backward else 2) * n_params * tokens


def mfu(model_flops, seconds, peak):
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    return None if peak is None or seconds <= 0 else model_flops / seconds / (peak * 1e12)


def steady_window(update_times):
    """(updates, seconds) after the first update: `update_times[k]` is when update k+1 ended."""
    if len(update_times) < 2:
        raise ValueError(f"need at least 2 updates to measure past the warm-up one, got {len(update_times)}")
    return len(update_times) - 1, update_times[-1] - update_times[0]


# ------------------------------------------------------------ the offline world --------------------------------
def word_level_tokenizer(texts, size):
    """A word-level tokenizer of `size` tokens: `<|endoftext|>` at 0, [UNK] at 1, the words and punctuation of
    `texts`, filler tokens up to `size` (Pythia's 50,277 before [PAD])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = [offline_world.EOS_TOKEN, "[UNK]"] + words
    if len(vocab) > size:
        raise ValueError(f"the data has {len(vocab)} distinct words, more than the tokenizer's {size} tokens")
    vocab += [f"<filler_{i}>" for i in range(size - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=offline_world.EOS_TOKEN,
                                   eos_token=offline_world.EOS_TOKEN, unk_token="[UNK]")


def lengthen(post, rng, words):
    """The post, with further story paragraphs (newline-separated) until it has `words` words."""
    while len(post.split()) < words:
        post += "\n" + offline_world.make_post(rng)["post"]
    return post


def build_world(root, tiny, device):
    """TL;DR-schema data, the Pythia-1B-shaped base model and tokenizer, a reward model (a sequence classifier with
    value_head's initialisation, which both sides load) under `root`. Returns the paths and parameter counts."""
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPTNeoXConfig

    import value_head

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    shape = STAGES["tiny" if tiny else "full"]
    rng = random.Random(1)
    sizes = (256, 16, 16) if tiny else (1024, 64, 64)
    sft = {n: offline_world.make_sft_split(rng, k) for n, k in zip(["train", "validation", "test"], sizes)}
    preference = {"train": offline_world.make_preference_split(rng, sizes[0], "train", ["batch3"], 1.25),
                  "validation": offline_world.make_preference_split(rng, sizes[1], "valid1", ["batch11"], 1.25),
                  "validation_cnndm": offline_world.make_preference_split(rng, 8, "valid2", ["batch0_cnndm"], 1.25)}
    for rows in sft.values():
        for r in rows:
            r["post"] = lengthen(r["post"], rng, shape["post_words"])
    for rows in preference.values():
        for r in rows:
            r["info"]["post"] = lengthen(r["info"]["post"], rng, shape["post_words"])
    offline_world.write_parquet_splits(os.path.join(root, "tldr_sft"), sft)
    offline_world.write_parquet_splits(os.path.join(root, "tldr_preference"), preference)
    texts = [offline_world.query_text(r) + " " + r["summary"] for rows in sft.values() for r in rows]
    texts += [offline_world.query_text(r["info"]) + x["text"] for rows in preference.values() for r in rows
              for x in r["summaries"]]
    tokenizer = word_level_tokenizer(texts, TOKENIZER_SIZE["tiny" if tiny else "pythia"])

    config = GPTNeoXConfig(**(TINY if tiny else PYTHIA_1B), hidden_dropout=0.0, attention_dropout=0.0)
    base, reward = os.path.join(root, "base_model"), os.path.join(root, "reward_model")
    torch.manual_seed(1)
    with torch.device(device):  # random initialisation on the GPU: seconds instead of a minute at 1B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    classifier = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    classifier.score.weight.data.copy_(value_head.scalar_head(config.hidden_size).weight.data)
    classifier.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    embedding = config.vocab_size * config.hidden_size
    policy_params = sum(p.numel() for p in model.parameters()) - embedding
    scalar_params = sum(p.numel() for p in classifier.parameters()) - embedding
    del model, classifier
    return dict(base_model=base, reward_model=reward, query_dataset=os.path.join(root, "tldr_sft"),
                label_dataset=os.path.join(root, "tldr_preference"), policy_params=policy_params,
                scalar_params=scalar_params, tokenizer_size=len(tokenizer), config=config.to_dict())


# ------------------------------------------------------------ running a stage ----------------------------------
def peak_memory_wrapper(record_path, script, argv):
    """Runs inside the stage's process: `script` as __main__ with `argv`; at exit writes its CUDA peak memory."""
    import atexit

    import torch

    def write():
        cuda = torch.cuda.is_available()
        with open(record_path, "w") as f:
            json.dump(dict(allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                           reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None), f)

    atexit.register(write)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def run_stage(name, script, cli, out_dir, prefix):
    """Run `script` with `cli` through the peak-memory wrapper; returns the progress-line times, peak memory, exit."""
    run_dir = os.path.join(out_dir, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    record = os.path.join(run_dir, "peak_memory.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--wrap", record, script, *map(str, cli), "--output-dir", run_dir]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    print(f"[gpu_check] {name}: {shlex.join(cmd[4:])}", flush=True)
    rc, rss_mib, lines = speed_vs_trl.run_measured(cmd, env, run_dir + ".log")
    if rc != 0:
        raise SystemExit(f"{name} failed (exit {rc}); see {run_dir}.log\n{''.join(l for _, l in lines[-30:])}")
    update_times = [t for t, line in lines if line.startswith(f"[{prefix}] ") and "/" in line.split()[1]]
    with open(record) as f:
        memory = json.load(f)
    for entry in os.listdir(run_dir):  # the saved models and checkpoints (GBs at 1B): only the logs are read
        path = os.path.join(run_dir, entry)
        if entry.endswith(".safetensors") or entry in ("checkpoints", "value_model"):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return dict(command=shlex.join(["python", script, *map(str, cli)]), run_dir=run_dir, update_times=update_times,
                peak_rss_mib=rss_mib, **memory)


def summarise(result, sequences_per_update, tokens_per_sequence, update_flops, peak):
    updates, seconds = steady_window(result["update_times"])
    result.update(sequences_per_second=updates * sequences_per_update / seconds,
                  tokens_per_second=updates * sequences_per_update * tokens_per_sequence / seconds,
                  seconds_per_update=seconds / updates, mfu=mfu(updates * update_flops, seconds, peak))
    return result


def run_ppo(w, shape, out_dir, peak):
    p, q = shape["ppo"], shape["query_length"]
    cli = ["--sft-model-path", w["base_model"], "--reward-model-path", w["reward_model"], "--query-dataset",
           w["query_dataset"], "--query-length", q, "--response-length", p["response_length"], "--batch-size",
           p["batch_size"], "--total-episodes", p["batch_size"] * p["updates"], "--local-micro-batch-size", p["micro"],
           "--local-rollout-forward-batch-size", p["chunk"], "--num-ppo-epochs", p["epochs"], "--lr", "3e-6",
           "--no-run-eval", "--checkpoint-every", "0", "--no-compute-missing-bias"]  # the classifier has no bias
    result = run_stage("ppo", "ppo_tldr.py", cli, out_dir, "ppo")
    with open(os.path.join(result["run_dir"], "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if '"ppo/episode"' in line][1:]  # after the warm-up update
    tokens = p["batch_size"] * (q + p["response_length"])
    n_pol, n_val = w["policy_params"], w["scalar_params"]
    phase_flops = dict(generation=flops(n_pol, tokens, False),  # prefill + one token at a time, KV cache
                       scoring=flops(n_pol + 2 * n_val, tokens, False),  # reference, value and reward forwards
                       training=p["epochs"] * flops(n_pol + n_val, tokens, True))
    split = {k: sum(m[f"time/{k}"] for m in metrics) / len(metrics) for k in phase_flops}
    summarise(result, p["batch_size"], q + p["response_length"], sum(phase_flops.values()), peak)
    result["time_split_s"] = dict(split, other=result["seconds_per_update"] - sum(split.values()))
    result["mfu_by_phase"] = {k: mfu(phase_flops[k], split[k], peak) for k in phase_flops}
    return result


def run_sft(w, shape, out_dir, peak):
    s, q = shape["sft"], shape["query_length"]
    cli = ["--base-model", w["base_model"], "--query-dataset", w["query_dataset"], "--query-length", q,
           "--response-length", s["response_length"], "--batch-size", s["batch_size"], "--local-micro-batch-size",
           s["micro"], "--total-episodes", s["batch_size"] * s["updates"], "--no-run-eval", "--checkpoint-every", "0"]
    tokens = s["batch_size"] * (q + s["response_length"])
    return summarise(run_stage("sft", "sft.py", cli, out_dir, "sft"), s["batch_size"], q + s["response_length"],
                     flops(w["policy_params"], tokens, True), peak)


def run_pairs(name, w, shape, out_dir, peak):
    """reward_model.py or dpo.py: `batch_size` pairs per update, chosen and rejected: 2 sequences per pair."""
    s, q = shape[name], shape["query_length"]
    cli = ["--sft-model-path", w["base_model"], "--label-dataset", w["label_dataset"], "--query-dataset",
           w["query_dataset"], "--query-length", q, "--response-length", s["response_length"], "--batch-size",
           s["batch_size"], "--local-micro-batch-size", s["micro"], "--total-episodes", s["batch_size"] * s["updates"],
           "--no-run-eval", "--checkpoint-every", "0"]
    if name == "reward_model":
        cli += ["--num-normalization-samples", 2 * s["micro"]]
    tokens = 2 * s["batch_size"] * (q + s["response_length"])
    update_flops = (flops(w["scalar_params"], tokens, True) if name == "reward_model"
                    else flops(w["policy_params"], tokens, True) + flops(w["policy_params"], tokens, False))  # + reference
    return summarise(run_stage(name, f"{name}.py", cli, out_dir, name), 2 * s["batch_size"], q + s["response_length"],
                     update_flops, peak)


def run_trl(w, shape, out_dir, cuda):
    """TRL 1.12's PPOTrainer on the same models, prompts and batch (benchmark/speed_vs_trl.py's worker)."""
    p, q = shape["ppo"], shape["query_length"]
    c = dict(size="gpu_check", query_length=q, response_length=p["response_length"], batch_size=p["batch_size"],
             local_micro_batch_size=p["micro"], local_rollout_forward_batch_size=p["chunk"], num_ppo_epochs=p["epochs"],
             updates=p["updates"], threads=os.cpu_count() or 1, lr=3e-6, eps=1e-5, use_cpu=not cuda, bf16=cuda)
    queries = os.path.join(out_dir, "trl_queries.json")
    pad = speed_vs_trl.prepare_queries(w, q, queries)
    return speed_vs_trl.run_trl(c, w, os.path.join(out_dir, "runs", "trl"), sys.executable, pad, queries)


# ------------------------------------------------------------ the report ---------------------------------------
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def report(header, results):
    out = ["# GPU check", "", *header, "",
           "| stage | sequences/s | tokens/s | s/update | peak GPU GiB (allocated / reserved) | peak RSS MiB | MFU |",
           "|---|---|---|---|---|---|---|"]
    for name in ["ppo", "sft", "reward_model", "dpo", "trl_ppo"]:
        r = results.get(name)
        if r is None:
            continue
        if name == "trl_ppo":
            out.append(f"| TRL {speed_vs_trl.TRL_VERSION} PPO | {r['eps']:.2f} | - | {r['seconds_per_update']:.2f} | - | "
                       f"{r['peak_mib']:.0f} | - |")
            continue
        out.append(f"| {name} | {r['sequences_per_second']:.2f} | {r['tokens_per_second']:.0f} | "
                   f"{r['seconds_per_update']:.2f} | {fmt(r['allocated_gib'], '.1f')} / {fmt(r['reserved_gib'], '.1f')} | "
                   f"{r['peak_rss_mib']:.0f} | {pct(r['mfu'])} |")
    ppo = results["ppo"]
    split = ppo["time_split_s"]
    out += ["", "PPO time per update: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()) + "; MFU by phase: "
            + ", ".join(f"{k} {pct(v)}" for k, v in ppo["mfu_by_phase"].items()) + "."]
    if "trl_ppo" in results:
        out.append(f"Episodes per second ours / TRL: **{results['ppo_vs_trl']:.2f}x**.")
    else:
        out.append("TRL: not importable here, not compared.")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", help="folder for gpu_check.json, gpu_check.md, the world and the runs")
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes on CPU: the same code in seconds")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from the table by name)")
    parser.add_argument("--stages", nargs="+", default=["ppo", "sft", "reward_model", "dpo", "trl"],
                        choices=["ppo", "sft", "reward_model", "dpo", "trl"], help="what to run")
    parser.add_argument("--wrap", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: RECORD SCRIPT ARGS...
    cli = parser.parse_args()
    if cli.wrap:
        return peak_memory_wrapper(cli.wrap[0], cli.wrap[1], cli.wrap[2:])
    if not cli.out_dir:
        parser.error("--out-dir is required")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not cli.tiny:
        raise SystemExit("no CUDA GPU here: the check at the paper's shapes needs one (--tiny runs on CPU)")
    if "ppo" not in cli.stages:
        parser.error("--stages must include ppo (the report and the TRL comparison are built around it)")
    if cli.peak_tflops is not None and cli.peak_tflops <= 0:
        raise SystemExit(f"--peak-tflops must be positive, got {cli.peak_tflops}")
    gpu = torch.cuda.get_device_name(0) if cuda else "none (CPU)"
    peak = peak_tflops(gpu, cli.peak_tflops) if cuda else cli.peak_tflops
    out_dir = os.path.abspath(cli.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shape = STAGES["tiny" if cli.tiny else "full"]
    start = time.time()
    w = build_world(os.path.join(out_dir, "world"), cli.tiny, "cuda" if cuda else "cpu")
    print(f"[gpu_check] world built in {time.time() - start:.0f} s: {w['policy_params']:,} parameters per policy "
          f"(without the input embedding), tokenizer {w['tokenizer_size']} tokens", flush=True)
    results = {}
    runners = dict(ppo=lambda: run_ppo(w, shape, out_dir, peak), sft=lambda: run_sft(w, shape, out_dir, peak),
                   reward_model=lambda: run_pairs("reward_model", w, shape, out_dir, peak),
                   dpo=lambda: run_pairs("dpo", w, shape, out_dir, peak))
    for stage in [s for s in cli.stages if s in runners]:
        results[stage] = runners[stage]()
    if "trl" in cli.stages and importlib.util.find_spec("trl") is not None and "ppo" in results:
        results["trl_ppo"] = run_trl(w, shape, out_dir, cuda)
        results["ppo_vs_trl"] = results["ppo"]["sequences_per_second"] / results["trl_ppo"]["eps"]
    header = [f"Command: `{shlex.join(['python'] + sys.argv)}`; {time.time() - start:.0f} s in all.", "",
              f"GPU: {gpu}; bf16 peak {fmt(peak, '.0f')} TFLOP/s; torch {torch.__version__}; Python "
              f"{platform.python_version()}; date {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
              f"Models: random GPT-NeoX, {w['policy_params']:,} parameters per policy without the input embedding "
              f"(N of the FLOP count: 2 N per token forward, 6 N forward + backward); query {shape['query_length']} "
              f"tokens; sequences/s and tokens/s over the updates after the first; reward_model and dpo: 2 sequences "
              f"per pair."]
    markdown = report(header, results)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(dict(header=header, gpu=gpu, peak_tflops=peak, shapes=shape, world={k: v for k, v in w.items()
                       if k != "config"}, model_config=w["config"], results=results), f, indent=2, default=str)
    print(markdown)


if __name__ == "__main__":
    main()
