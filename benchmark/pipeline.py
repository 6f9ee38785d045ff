# See benchmark/README.md "Offline benchmark" for the results of this pipeline and how to read them.
"""The offline RLHF benchmark: world -> sft.py -> reward_model.py -> ppo_tldr.py and dpo.py, judged by the gold judge.

    python benchmark/pipeline.py                      # benchmark-sized world, ~22 min on 2 idle CPU cores
    python benchmark/pipeline.py --seeds 1 2 3        # SFT and reward model once, PPO and DPO per seed: ~36 min
    python benchmark/pipeline.py --quick              # quick world, about 4.5 min on 2 cores
    python benchmark/pipeline.py --quick --seeds 1 2 3                # PPO and DPO with 3 seeds from one SFT and RM
    python benchmark/pipeline.py --quick --seeds 1 2 3 --full-seeds   # the whole pipeline with each seed
    python benchmark/pipeline.py --plot runs/quick    # draw the plots of an earlier run from its results.json

Every stage runs through its script's command line (no private shortcuts), with fixed seeds. Every policy is then
evaluated on held-out validation posts with the gold judge (benchmark/offline_world.py `score`): win rate against
the reference summaries (ties half, as the paper reports), mean gold score, mean response length and EOS rate, at
temperature 0.01 (as the scripts evaluate) and 0.7 (as PPO samples). The reward model's validation accuracy is
measured against the noisy labels and against the noiseless judge. Writes results.md, results.json and, when
matplotlib is installed, plots; the last thing on stdout is a table of every stage.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import offline_world  # noqa: E402

# Hyperparameters of the offline world (a ~1M-parameter model trained from scratch, not a pre-trained Pythia: the
# paper's lr 3e-6 is for a pre-trained 1B model). Shared flags first, then each stage's own. The scripts' own
# evaluations are off but the reward model's (its accuracies come from it): the pipeline judges every policy itself.
SETTINGS = {
    "small": dict(
        size="small", query_length=128, judge_posts=1000,  # judged: all validation posts
        # SFT 2,600 updates of 32 sequences, the longest stage (benchmark/README.md "Benchmark setting")
        sft=["--lr", "1e-3", "--batch-size", "32", "--local-micro-batch-size", "32", "--num-train-epochs", "5",
             "--total-episodes", "83200", "--no-run-eval"],
        reward_model=["--lr", "1e-4", "--batch-size", "32", "--local-micro-batch-size", "32",
                      "--num-normalization-samples", "2000", "--local-eval-batch-size", "32"],
        ppo=["--lr", "5e-5", "--total-episodes", "2560", "--batch-size", "64", "--local-micro-batch-size", "32",
             "--local-rollout-forward-batch-size", "64", "--sample-table-every", "5",
             "--local-eval-batch-size", "64", "--no-run-eval"],  # the gold curve's validation batch (the reference samples 2)
        dpo=["--lr", "1e-4", "--beta", "0.1", "--batch-size", "32", "--local-micro-batch-size", "32",
             "--local-eval-batch-size", "32", "--total-episodes", "9216", "--no-run-eval"],  # 288 of 625 updates of an epoch
    ),
    # The test model's size on the quick world (4 heads, full rotary: SFT learns to copy the post's main fact). SFT
    # runs 2,000 updates of 32 sequences, about half of the run. PPO's validation score (16 prompts
    # per update for the gold curve; the reference samples 2) levels off within a few hundred episodes, DPO's
    # training accuracy within 50 updates; DPO keeps its default beta (0.05, the reference's). The scripts' own
    # evaluations are off (the pipeline judges every policy itself; the reward model's is kept: its accuracies come
    # from it). Results per seed: benchmark/README.md "Quick setting".
    "quick": dict(
        size="quick", query_length=96, response_length=40, judge_posts=500,
        sft=["--lr", "3e-3", "--batch-size", "32", "--local-micro-batch-size", "32", "--num-train-epochs", "3",
             "--total-episodes", "64000", "--no-run-eval"],
        reward_model=["--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "32", "--total-episodes", "6400",
                      "--num-normalization-samples", "1000", "--local-eval-batch-size", "64"],
        ppo=["--lr", "1e-4", "--total-episodes", "1024", "--batch-size", "64", "--local-micro-batch-size", "32",
             "--local-rollout-forward-batch-size", "32", "--sample-table-every", "5", "--local-eval-batch-size", "16",
             "--no-run-eval"],
        dpo=["--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "32",
             "--local-eval-batch-size", "64", "--total-episodes", "4800", "--no-run-eval"],
    ),
    # The test suite's: every stage for two updates on the test world; it checks the plumbing, not the numbers.
    "smoke": dict(
        size="tiny", query_length=96, response_length=40, eval_posts=8, judge_posts=16,
        sft=["--lr", "3e-3", "--batch-size", "32", "--local-micro-batch-size", "32", "--total-episodes", "64",
             "--local-eval-batch-size", "8"],
        reward_model=["--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "32", "--total-episodes", "64",
                      "--num-normalization-samples", "32", "--num-eval-samples", "32", "--local-eval-batch-size", "32"],
        ppo=["--lr", "1e-4", "--total-episodes", "32", "--batch-size", "16", "--local-micro-batch-size", "16",
             "--local-rollout-forward-batch-size", "16"],
        dpo=["--lr", "3e-4", "--batch-size", "32", "--local-micro-batch-size", "32", "--total-episodes", "64",
             "--local-eval-batch-size", "8"],
    ),
}
RESPONSE_LENGTH = 53  # tokens generated per post in the evaluation, unless the setting says: SFT's and PPO's default
TEMPERATURES = ("0.01", "0.7")
STAGES = ("sft", "reward_model", "ppo", "dpo")
POLICIES = ("sft", "ppo", "dpo")


def plan(seeds, full_seeds):
    """The runs, one per seed: its stages and the seed whose world, SFT policy and reward model it uses. Without
    --full-seeds the world, SFT and reward model run once (first seed) and PPO and DPO start from them with each
    seed, the comparison the paper makes; with it, every seed runs the whole pipeline."""
    return [dict(seed=seed, base=seed if full_seeds else seeds[0],
                 stages=["world", *STAGES] if full_seeds or i == 0 else ["ppo", "dpo"]) for i, seed in enumerate(seeds)]


def stage_command(stage, settings, seed_dir, base_dir, seed):
    """The command line of one stage; its output folder is {seed_dir}/{stage}, its inputs come from base_dir."""
    world, sft_dir, rm_dir = (os.path.join(base_dir, n) for n in ["world", "sft", "reward_model"])
    out = ["--output-dir", os.path.join(seed_dir, stage), "--seed", str(seed), "--query-length", str(settings["query_length"])]
    if "response_length" in settings:  # else each script's default (53 SFT and PPO, 169 reward model and DPO)
        out += ["--response-length", str(settings["response_length"])]
        out += ["--eval-response-length", str(settings["response_length"])] if stage == "dpo" else []
    # posts of the script's own evaluation, where it runs one (eval_posts: the smoke setting only)
    evaluated = [] if "--no-run-eval" in settings[stage] else ["--num-eval-samples", str(settings["eval_posts"])]
    return {
        "sft": ["sft.py", "--base-model", f"{world}/base_model", "--query-dataset", f"{world}/tldr_sft", *evaluated],
        "reward_model": ["reward_model.py", "--sft-model-path", sft_dir, "--label-dataset", f"{world}/tldr_preference",
                         "--query-dataset", f"{world}/tldr_sft"],
        "ppo": ["ppo_tldr.py", "--sft-model-path", sft_dir, "--reward-model-path", rm_dir, "--query-dataset",
                f"{world}/tldr_sft", *evaluated],
        "dpo": ["dpo.py", "--sft-model-path", sft_dir, "--label-dataset", f"{world}/tldr_preference", "--query-dataset",
                f"{world}/tldr_sft", *evaluated],
    }[stage] + out + settings[stage]


def run_stage(name, command, log_path):
    """Run one script through its command line; its output goes to log_path. Returns seconds taken."""
    print(f"[pipeline] {name}: {' '.join(command)}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"[pipeline] {name} failed (exit {result.returncode}); see {log_path}")
    print(f"[pipeline] {name}: done in {time.time() - start:.0f} s", flush=True)
    return time.time() - start


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def evaluate_policy(policy_path, rows, query_length, response_length, temperature, seed):
    """Greedy-ish or sampled responses of a saved policy to `rows` (SFT validation posts), judged by the gold judge."""
    import torch

    import ppo_tldr as p  # the helpers of the PPO script: query format, truncation, sampler

    torch.manual_seed(seed)
    tokenizer = p.load_tokenizer(policy_path, "policy")
    policy = p.load_policy(policy_path, tokenizer, torch.device("cpu")).eval()
    queries = p.left_padded_queries(tokenizer, rows, query_length)  # (N, Q)
    responses = []
    for i in range(0, len(rows), 64):
        query_response, _ = p.generate(policy, queries[i : i + 64], tokenizer.pad_token_id, response_length, temperature)
        responses.append(p.truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id, query_response[:, query_length:]))
    responses = torch.cat(responses)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    ended = [bool((r == tokenizer.eos_token_id).any()) for r in responses]
    lengths = [int((r != tokenizer.pad_token_id).sum()) for r in responses]
    return judge(rows, texts, ended, lengths)


def binomial_se(p, n):
    """Standard error of a win rate p measured on n posts, sqrt(p (1 - p) / n); ties (scored half) make the true
    standard error smaller, so this is an upper bound."""
    return math.sqrt(p * (1.0 - p) / n)


def judge(rows, texts, ended, lengths):
    posts, references = [r["post"] for r in rows], [r["summary"] for r in rows]
    gold = [offline_world.score(post, text, end) for post, text, end in zip(posts, texts, ended)]
    win_rate = offline_world.win_rate(posts, texts, references, ours_ended=ended)
    return dict(
        win_rate=win_rate, win_rate_se=binomial_se(win_rate, len(rows)),
        gold_score=sum(gold) / len(gold), response_tokens=sum(lengths) / len(lengths),
        eos_rate=sum(ended) / len(ended), example=texts[0],
    )


def reward_model_accuracy(eval_table, preference_rows):
    """Accuracy of the reward model's validation predictions against the labels and against the noiseless judge."""
    posts = {r["info"]["id"]: r["info"]["post"] for r in preference_rows}
    labels, gold = 0.0, 0.0
    for row in eval_table:
        predicted_chosen = row["reward_chosen"] > row["reward_rejected"]
        labels += predicted_chosen
        s_chosen = offline_world.score(posts[row["id"]], row["chosen"])
        s_rejected = offline_world.score(posts[row["id"]], row["rejected"])
        gold += 0.5 if s_chosen == s_rejected else float(predicted_chosen == (s_chosen > s_rejected))
    return labels / len(eval_table), gold / len(eval_table)


def ppo_curves(ppo_dir, validation_by_id):
    """Per update: score, KL, validation score; per sample table (whichever samples_update_*.jsonl the run wrote):
    the gold win rate of its validation samples."""
    metrics = [m for m in read_jsonl(os.path.join(ppo_dir, "metrics.jsonl")) if "ppo/episode" in m]
    curves = dict(episode=[m["ppo/episode"] for m in metrics], scores=[m["objective/scores"] for m in metrics],
                  kl=[m["objective/kl"] for m in metrics],
                  validation_score=[m["objective/validation_score"] for m in metrics], gold_episode=[], gold_win_rate=[])
    tables = [f for f in os.listdir(ppo_dir) if f.startswith("samples_update_") and f.endswith(".jsonl")]
    for name in sorted(tables, key=lambda f: int(f[len("samples_update_"):-len(".jsonl")])):
        table = read_jsonl(os.path.join(ppo_dir, name))
        rows = [validation_by_id[r["id"]] for r in table]
        curves["gold_episode"].append(table[0]["episode"])
        curves["gold_win_rate"].append(offline_world.win_rate([r["post"] for r in rows], [r["response"] for r in table],
                                                              [r["summary"] for r in rows], [r["has_eos"] for r in table]))
    return curves


def mean_sd(values):
    """Mean and sample standard deviation (n - 1) over seeds; sd is None for a single seed."""
    return dict(mean=statistics.mean(values), sd=statistics.stdev(values) if len(values) > 1 else None, n=len(values))


def summarize(policies, base_of):
    """Per stage and temperature: mean and sd over seeds of each metric; per comparison (PPO - SFT, DPO - SFT,
    PPO - DPO): the win-rate difference per seed, each PPO/DPO run against the SFT policy it started from."""
    summary = {stage: {t: {k: mean_sd([r[k] for r in by_seed.values()])
                           for k in ["win_rate", "win_rate_se", "gold_score", "response_tokens", "eos_rate"]}
                       for t, by_seed in policies[stage].items()} for stage in POLICIES}
    gains = {}
    for a, b in [("ppo", "sft"), ("dpo", "sft"), ("ppo", "dpo")]:
        gains[f"{a} - {b}"] = {}
        for t in TEMPERATURES:
            per_seed = {seed: r["win_rate"] - policies[b][t][base_of[seed] if b == "sft" else seed]["win_rate"]
                        for seed, r in policies[a][t].items()}
            gains[f"{a} - {b}"][t] = dict(per_seed=per_seed, **mean_sd(list(per_seed.values())))
    return summary, gains


def ppo_against_dpo(gain):
    """Whether PPO's win-rate margin over DPO (`gain`: mean and sd over seeds of PPO - DPO) exceeds its spread."""
    if gain["sd"] is None:
        return "one seed: no spread to compare with"
    better, margin = ("PPO", gain["mean"]) if gain["mean"] > 0 else ("DPO", -gain["mean"])
    return (f"{better} beats {'DPO' if better == 'PPO' else 'PPO'} by {margin:.3f}, "
            + ("more" if margin > gain["sd"] else "not more") + f" than the sd over seeds ({gain['sd']:.3f})")


def seconds_per_seed(results):
    """Per seed, the wall time of its whole pipeline: world, SFT and reward model of the seed it started from, and
    its own PPO, DPO and evaluation."""
    s = results["seconds"]
    return {str(run["seed"]): sum(s[k][str(run["base"])] for k in ("world", "sft", "reward_model"))
            + sum(s[k][str(run["seed"])] for k in ("ppo", "dpo", "evaluation"))
            for run in plan(results["seeds"], results["full_seeds"])}


def fmt_sd(stat, digits=3):
    return "-" if stat["sd"] is None else f"{stat['sd']:.{digits}f}"


def write_markdown(results, out_dir):
    seeds, n = results["seeds"], results["judge_posts"]
    first = str(seeds[0])
    world = results["world"][first]
    how = ("every stage (world, SFT, reward model, PPO, DPO) with each seed" if results["full_seeds"] else
           f"world, SFT and reward model with seed {seeds[0]}; PPO and DPO from them with each seed")
    lines = [f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
             f"World: size {world['size']}, {world['parameters']:,} parameters, labels agree with the gold judge "
             f"{world['label_agreement_with_gold_judge']['validation']:.3f} (validation, seed {first})  ",
             f"Seeds {', '.join(map(str, seeds))}: {how}.  ",
             f"Judged on the first {n} SFT validation posts; ± is the binomial standard error of a win rate, "
             f"sqrt(p (1 - p) / {n}) (an upper bound: ties count half).", "",
             "| policy | seed | temperature | win rate vs reference | gold score | response tokens | EOS rate |",
             "|---|---|---|---|---|---|---|"]
    for seed, gold in results["reference_gold_score"].items():
        lines.append(f"| reference summaries | {seed} | - | 0.500 | {gold:.3f} | - | - |")
    for stage in POLICIES:
        for t, by_seed in results["policies"][stage].items():
            for seed, r in by_seed.items():
                lines.append(f"| {stage.upper()} | {seed} | {t} | {r['win_rate']:.3f} ± {r['win_rate_se']:.3f} | "
                             f"{r['gold_score']:.3f} | {r['response_tokens']:.1f} | {r['eos_rate']:.3f} |")
    if len(seeds) > 1:
        lines += ["", "Over seeds (mean, and the standard deviation over seeds):", "",
                  "| policy | temperature | seeds | win rate: mean | sd | binomial SE (mean) | gold score: mean | sd | "
                  "EOS rate: mean |", "|---|---|---|---|---|---|---|---|---|"]
        for stage in POLICIES:
            for t, s in results["summary"][stage].items():
                lines.append(f"| {stage.upper()} | {t} | {s['win_rate']['n']} | {s['win_rate']['mean']:.3f} | "
                             f"{fmt_sd(s['win_rate'])} | {s['win_rate_se']['mean']:.3f} | {s['gold_score']['mean']:.3f} | "
                             f"{fmt_sd(s['gold_score'])} | {s['eos_rate']['mean']:.3f} |")
    lines += ["", "Win-rate differences (each PPO and DPO run against the SFT policy it started from):", "",
              "| difference | temperature | per seed | mean | sd over seeds |", "|---|---|---|---|---|"]
    for name, by_t in results["gains"].items():
        for t, g in by_t.items():
            per_seed = ", ".join(f"{v:+.3f}" for v in g["per_seed"].values())
            lines.append(f"| {name.upper()} | {t} | {per_seed} | {g['mean']:+.3f} | {fmt_sd(g)} |")
    lines += [""] + [f"PPO against DPO at temperature {t}: {ppo_against_dpo(g)}.  "
                     for t, g in results["gains"]["ppo - dpo"].items()]
    lines += ["", "| reward model | accuracy against the labels | against the noiseless gold judge | labels agree |",
              "|---|---|---|---|"]
    for seed, rm in results["reward_model"].items():
        agreement = results["world"][seed]["label_agreement_with_gold_judge"]["validation"]
        lines.append(f"| seed {seed} | {rm['accuracy_labels']:.3f} | {rm['accuracy_gold_judge']:.3f} | {agreement:.3f} |")
    columns = [str(s) for s in seeds]
    lines += ["", "| stage | " + " | ".join(f"seconds, seed {s}" for s in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for stage, by_seed in results["seconds"].items():
        lines.append(f"| {stage} | " + " | ".join(f"{by_seed[s]:.0f}" if s in by_seed else "-" for s in columns) + " |")
    per_seed = seconds_per_seed(results)
    lines += ["", f"Wall time of the whole command: {results['wall_seconds']:.0f} s. One seed's whole pipeline (world, "
              "SFT and reward model of the seed it starts from, its PPO, DPO and evaluation): "
              + ", ".join(f"seed {s} {v:.0f} s" for s, v in per_seed.items()) + "."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def stage_table(results):
    """The closing table on stdout: per stage, the greedy win rate, gold score and EOS rate, and its seconds."""
    seeds, greedy = results["seeds"], TEMPERATURES[0]
    summary, seconds = results["summary"], results["seconds"]

    def win(stage):
        s = summary[stage][greedy]
        if s["win_rate"]["n"] == 1:
            return f"{s['win_rate']['mean']:.3f} ± {s['win_rate_se']['mean']:.3f}"
        return f"{s['win_rate']['mean']:.3f} (sd {s['win_rate']['sd']:.3f}, {s['win_rate']['n']} seeds)"

    def secs(stage):
        return f"{sum(seconds[stage].values()):.0f}"

    references = list(results["reference_gold_score"].values())
    lines = [f"Greedy (temperature {greedy}) on {results['judge_posts']} validation posts; ± is the binomial standard "
             "error" + ("." if len(seeds) == 1 else ", sd the standard deviation over seeds; seconds summed over seeds."),
             "", "| stage | win rate vs reference | gold score | EOS rate | seconds |", "|---|---|---|---|---|",
             f"| world | - | - | - | {secs('world')} |",
             f"| reference summaries | 0.500 | {statistics.mean(references):.3f} | - | - |"]
    for stage in STAGES:
        if stage == "reward_model":
            lines.append(f"| reward model | - | - | - | {secs(stage)} |")
            continue
        s = summary[stage][greedy]
        lines.append(f"| {stage.upper()} | {win(stage)} | {s['gold_score']['mean']:.3f} | {s['eos_rate']['mean']:.3f} | "
                     f"{secs(stage)} |")
    lines += [f"| evaluation | - | - | - | {secs('evaluation')} |",
              f"| total (wall time) | - | - | - | {results['wall_seconds']:.0f} |"]
    return "\n".join(lines)


def plot(results, out_dir):
    """ppo_curves.png (one line per seed) and win_rate_by_stage.png (mean over seeds, every seed a dot, error bars:
    the sd over seeds, or the binomial standard error for one seed). Returns False when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (key, x, title) in zip(axes, [("scores", "episode", "reward-model score (rollouts)"),
                                          ("kl", "episode", "KL(policy || SFT), summed over tokens"),
                                          ("validation_score", "episode", "validation score (temperature 0.01)"),
                                          ("gold_win_rate", "gold_episode", "gold win rate vs reference (validation batch)")]):
        for seed, curves in results["ppo_curves"].items():
            ax.plot(curves[x], curves[key], marker="." if key == "gold_win_rate" else None, label=f"seed {seed}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("episodes")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ppo_curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for k, t in enumerate(TEMPERATURES):
        xs, means, errors = [], [], []
        for i, stage in enumerate(POLICIES):
            x = i + 1 + (k - 0.5) * width
            values = [r["win_rate"] for r in results["policies"][stage][t].values()]
            stat = results["summary"][stage][t]
            xs.append(x)
            means.append(stat["win_rate"]["mean"])
            errors.append(stat["win_rate"]["sd"] if len(values) > 1 else stat["win_rate_se"]["mean"])
            ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
        color = f"C{k}"
        ax.bar_label(ax.bar((k - 0.5) * width, 0.5, width, color=color), fmt="%.2f", fontsize=8)
        bars = ax.bar(xs, means, width, yerr=errors, capsize=3, color=color, label=f"temperature {t}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=4)
    ax.set_xticks(range(4), ["reference", "SFT", "PPO", "DPO"])
    ax.set_ylabel("gold-judge win rate vs reference")
    ax.set_ylim(0, 1.1)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "win_rate_by_stage.png"), dpi=110)
    plt.close(fig)
    return True


def run_pipeline(settings, seeds, full_seeds, work, command):
    """Every stage of every seed, then the gold-judge evaluation of every policy; returns the results."""
    start = time.time()
    runs = plan(seeds, full_seeds)
    seconds = {k: {} for k in ["world", *STAGES, "evaluation"]}
    worlds = {}
    for run in runs:
        seed, seed_dir = run["seed"], os.path.join(work, f"seed{run['seed']}")
        base_dir = os.path.join(work, f"seed{run['base']}")
        os.makedirs(seed_dir, exist_ok=True)
        for stage in run["stages"]:
            if stage == "world":
                t = time.time()
                worlds[str(seed)] = offline_world.build(os.path.join(seed_dir, "world"), settings["size"], seed, verbose=False)
                seconds["world"][str(seed)] = time.time() - t
                continue
            shutil.rmtree(os.path.join(seed_dir, stage), ignore_errors=True)  # a fresh start: a script refuses to
            # start a fresh run over an earlier run's checkpoints
            seconds[stage][str(seed)] = run_stage(f"{stage} (seed {seed})", stage_command(stage, settings, seed_dir,
                                                                                          base_dir, seed),
                                                  os.path.join(seed_dir, f"{stage}.log"))

    import datasets

    policies = {stage: {t: {} for t in TEMPERATURES} for stage in POLICIES}
    reward_model, curves, reference_gold = {}, {}, {}
    for run in runs:
        t0 = time.time()
        seed, seed_dir = str(run["seed"]), os.path.join(work, f"seed{run['seed']}")
        world = os.path.join(work, f"seed{run['base']}", "world")
        validation = datasets.load_dataset(f"{world}/tldr_sft", split="validation")
        rows = [validation[i] for i in range(min(settings["judge_posts"], len(validation)))]
        if "world" in run["stages"]:
            reference_gold[seed] = sum(offline_world.score(r["post"], r["summary"]) for r in rows) / len(rows)
        for stage in [s for s in POLICIES if s in run["stages"]]:
            for t in TEMPERATURES:
                policies[stage][t][seed] = evaluate_policy(os.path.join(seed_dir, stage), rows, settings["query_length"],
                                                           settings.get("response_length", RESPONSE_LENGTH), float(t),
                                                           run["seed"])
            print(f"[pipeline] {stage} (seed {seed}): " + ", ".join(
                f"T={t} win {policies[stage][t][seed]['win_rate']:.3f} gold {policies[stage][t][seed]['gold_score']:.2f}"
                for t in TEMPERATURES), flush=True)
        if "reward_model" in run["stages"]:
            preference_validation = datasets.load_dataset(f"{world}/tldr_preference", split="validation")
            labels, gold = reward_model_accuracy(read_jsonl(os.path.join(seed_dir, "reward_model", "eval_validation.jsonl")),
                                                 preference_validation)
            reward_model[seed] = dict(accuracy_labels=labels, accuracy_gold_judge=gold)
        curves[seed] = ppo_curves(os.path.join(seed_dir, "ppo"), {r["id"]: r for r in validation})
        seconds["evaluation"][seed] = time.time() - t0

    summary, gains = summarize(policies, {str(r["seed"]): str(r["base"]) for r in runs})
    import torch

    return dict(
        command=command, machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        seeds=seeds, full_seeds=full_seeds, world=worlds, judge_posts=len(rows), reference_gold_score=reference_gold,
        policies=policies, summary=summary, gains=gains, reward_model=reward_model, ppo_curves=curves, seconds=seconds,
        wall_seconds=time.time() - start,
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick world and short runs (about 4.5 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="the test suite's setting: a few updates per stage on the test world (plumbing only)")
    parser.add_argument("--work-dir", default=None, help="folder for the worlds, the models and the logs, one "
                        "subfolder per seed (default: runs/benchmark)")
    parser.add_argument("--results-dir", default=None, help="folder for results.md/json and plots (default: work dir)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the world and of every stage (default: 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of PPO and DPO, each run from the SFT policy and reward model of the first seed")
    parser.add_argument("--full-seeds", action="store_true", help="with --seeds: run the whole pipeline with each seed")
    parser.add_argument("--plot", default=None, metavar="RESULTS_DIR",
                        help="only draw the plots of an earlier run from RESULTS_DIR/results.json (needs matplotlib)")
    cli = parser.parse_args(argv)
    if cli.plot is not None:
        given = [f for f in ["quick", "smoke", "work_dir", "results_dir", "seed", "seeds", "full_seeds"]
                 if getattr(cli, f) is not None and getattr(cli, f) is not False]
        if given:
            parser.error(f"--plot draws an earlier run's plots and takes no other option, got --{given[0].replace('_', '-')}")
        return cli
    if cli.quick and cli.smoke:
        parser.error("--quick and --smoke are two different settings: give one of them")
    if cli.seed is not None and cli.seeds is not None:
        parser.error("give --seed (one seed) or --seeds (several), not both")
    if cli.seeds is not None and len(set(cli.seeds)) != len(cli.seeds):
        parser.error(f"--seeds must be distinct, got {cli.seeds}")
    if cli.full_seeds and cli.seeds is None:
        parser.error("--full-seeds repeats the whole pipeline for each of --seeds: give --seeds")
    cli.seeds = cli.seeds or [1 if cli.seed is None else cli.seed]
    return cli


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = parse_args(argv)
    if cli.plot is not None:
        with open(os.path.join(cli.plot, "results.json")) as f:
            results = json.load(f)
        if not plot(results, cli.plot):
            raise SystemExit("[pipeline] --plot needs matplotlib: pip install matplotlib")
        print(f"[pipeline] wrote {cli.plot}/ppo_curves.png and {cli.plot}/win_rate_by_stage.png")
        return
    settings = SETTINGS["quick" if cli.quick else "smoke" if cli.smoke else "small"]
    work = os.path.abspath(cli.work_dir or "runs/benchmark")
    results_dir = os.path.abspath(cli.results_dir or work)
    os.makedirs(work, exist_ok=True)
    os.makedirs(results_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the world's parquet and model writes
    transformers.utils.logging.disable_progress_bar()

    results = run_pipeline(settings, cli.seeds, cli.full_seeds, work, shlex.join(["python", "benchmark/pipeline.py", *argv]))
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(results, results_dir)
    print(f"[pipeline] wrote {results_dir}/results.md and results.json", flush=True)
    if plot(results, results_dir):
        print(f"[pipeline] wrote {results_dir}/ppo_curves.png and win_rate_by_stage.png", flush=True)
    else:
        print(f"[pipeline] no plots: matplotlib is not installed; `pip install matplotlib`, then "
              f"`python benchmark/pipeline.py --plot {shlex.quote(results_dir)}` draws them from results.json", flush=True)
    print(stage_table(results))


if __name__ == "__main__":
    main()
