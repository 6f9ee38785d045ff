import json
import sys

import pytest

import pipeline

POST = "my mom hid my keys. my uncle fixed my bike. i feel sad. should i move out?"
GOOD = "my mom hid my keys. i feel sad. should i move out?"  # gold 4.0
BAD = "my dad stole my car."  # gold -1.5


def test_judge_summary_of_a_policy():
    rows = [dict(post=POST, summary="my mom hid my keys.")] * 2  # reference gold 2.0
    result = pipeline.judge(rows, [GOOD, BAD], ended=[True, False], lengths=[12, 8])
    assert result["win_rate"] == 0.5  # one win, one loss
    assert result["gold_score"] == pytest.approx((4.0 + (-1.5 - 1.0)) / 2)  # the second one has no end
    assert result["response_tokens"] == 10 and result["eos_rate"] == 0.5


def test_reward_model_accuracy_against_labels_and_the_gold_judge():
    preference = [dict(info=dict(id="a", post=POST)), dict(info=dict(id="b", post=POST))]
    table = [
        dict(id="a", chosen=GOOD, rejected=BAD, reward_chosen=1.0, reward_rejected=0.0),  # agrees with both
        dict(id="b", chosen=BAD, rejected=GOOD, reward_chosen=0.0, reward_rejected=1.0),  # noisy label; RM sides with the judge
    ]
    labels, gold = pipeline.reward_model_accuracy(table, preference)
    assert labels == 0.5 and gold == 1.0


def test_ppo_curves_read_metrics_and_sample_tables(tmp_path):
    metrics = [{"step": u, "ppo/episode": 64 * u, "objective/scores": 0.1 * u, "objective/kl": 0.01 * u,
                "objective/validation_score": 0.2 * u} for u in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    for update, response in [(10, GOOD), (2, BAD)]:  # sorted by update number, not by name
        row = dict(update=update, episode=64 * update, id="x", response=response, has_eos=True)
        (tmp_path / f"samples_update_{update}.jsonl").write_text(json.dumps(row) + "\n")
    curves = pipeline.ppo_curves(str(tmp_path), {"x": dict(post=POST, summary="my mom hid my keys.")})
    assert curves["episode"] == [64, 128] and curves["kl"] == [0.01, 0.02]
    assert curves["gold_episode"] == [128, 640] and curves["gold_win_rate"] == [0.0, 1.0]


def test_ppo_curves_read_whichever_sample_tables_exist(tmp_path):
    metrics = [{"step": 1, "ppo/episode": 64, "objective/scores": 0.1, "objective/kl": 0.0,
                "objective/validation_score": 0.3}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(metrics[0]) + "\n")
    (tmp_path / "samples_update_221.jsonl.tmp").write_text("not a table\n")  # not a finished table: not read
    curves = pipeline.ppo_curves(str(tmp_path), {})
    assert curves["validation_score"] == [0.3] and curves["gold_episode"] == [] and curves["gold_win_rate"] == []


def test_binomial_standard_error():
    assert pipeline.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert pipeline.binomial_se(0.9, 100) == pytest.approx(0.03)
    assert pipeline.binomial_se(1.0, 10) == 0.0


def test_plan_shares_sft_and_reward_model_unless_full_seeds():
    assert pipeline.plan([1, 2], full_seeds=False) == [
        dict(seed=1, base=1, stages=["world", "sft", "reward_model", "ppo", "dpo"]),
        dict(seed=2, base=1, stages=["ppo", "dpo"]),
    ]
    assert pipeline.plan([3, 5], full_seeds=True) == [
        dict(seed=3, base=3, stages=["world", "sft", "reward_model", "ppo", "dpo"]),
        dict(seed=5, base=5, stages=["world", "sft", "reward_model", "ppo", "dpo"]),
    ]


def test_stage_commands_read_the_base_seed_and_write_their_own():
    settings = pipeline.SETTINGS["smoke"]
    command = pipeline.stage_command("ppo", settings, "/w/seed2", "/w/seed1", 2)
    assert command[0] == "ppo_tldr.py"
    for flag, value in [("--sft-model-path", "/w/seed1/sft"), ("--reward-model-path", "/w/seed1/reward_model"),
                        ("--query-dataset", "/w/seed1/world/tldr_sft"), ("--output-dir", "/w/seed2/ppo"), ("--seed", "2")]:
        assert command[command.index(flag) + 1] == value
    assert command[command.index("--num-eval-samples") + 1] == str(settings["eval_posts"])  # smoke: evaluated
    for setting in ("small", "quick"):  # the pipeline judges the policies; no evaluation flag left unused
        command = pipeline.stage_command("sft", pipeline.SETTINGS[setting], "/w/seed1", "/w/seed1", 1)
        assert "--no-run-eval" in command and "--num-eval-samples" not in command


def metrics(win_rate):
    return dict(win_rate=win_rate, win_rate_se=pipeline.binomial_se(win_rate, 100), gold_score=2 * win_rate,
                response_tokens=10.0, eos_rate=1.0, example="")


def test_summary_over_seeds_and_gains_against_the_sft_each_run_started_from():
    policies = {"sft": {t: {"1": metrics(0.3)} for t in pipeline.TEMPERATURES},
                "ppo": {t: {"1": metrics(0.8), "2": metrics(0.9)} for t in pipeline.TEMPERATURES},
                "dpo": {t: {"1": metrics(0.7), "2": metrics(0.6)} for t in pipeline.TEMPERATURES}}
    summary, gains = pipeline.summarize(policies, {"1": "1", "2": "1"})
    ppo = summary["ppo"]["0.01"]["win_rate"]
    assert ppo["mean"] == pytest.approx(0.85) and ppo["sd"] == pytest.approx(0.05 * 2 ** 0.5) and ppo["n"] == 2
    assert summary["sft"]["0.01"]["win_rate"] == dict(mean=0.3, sd=None, n=1)  # one SFT policy: no spread
    g = gains["ppo - sft"]["0.7"]
    assert g["per_seed"] == pytest.approx({"1": 0.5, "2": 0.6}) and g["mean"] == pytest.approx(0.55)
    assert g["sd"] == pytest.approx(0.05 * 2 ** 0.5)
    g = gains["ppo - dpo"]["0.01"]
    assert g["per_seed"] == pytest.approx({"1": 0.1, "2": 0.3}) and g["sd"] == pytest.approx(0.1 * 2 ** 0.5)
    _, gains = pipeline.summarize({**policies, "sft": {t: {"1": metrics(0.3), "2": metrics(0.5)}
                                                       for t in pipeline.TEMPERATURES}}, {"1": "1", "2": "2"})
    assert gains["ppo - sft"]["0.01"]["per_seed"] == pytest.approx({"1": 0.5, "2": 0.4})  # --full-seeds: its own SFT


def test_ppo_against_dpo_compares_the_margin_with_the_spread():
    assert pipeline.ppo_against_dpo(dict(mean=0.05, sd=0.02, n=3)) == \
        "PPO beats DPO by 0.050, more than the sd over seeds (0.020)"
    assert pipeline.ppo_against_dpo(dict(mean=-0.01, sd=0.04, n=3)) == \
        "DPO beats PPO by 0.010, not more than the sd over seeds (0.040)"
    assert pipeline.ppo_against_dpo(dict(mean=0.05, sd=None, n=1)).startswith("one seed")


def test_seconds_per_seed_count_the_shared_stages_of_the_first_seed():
    seconds = dict(world={"1": 10}, sft={"1": 500}, reward_model={"1": 300}, ppo={"1": 200, "2": 210},
                   dpo={"1": 150, "2": 160}, evaluation={"1": 60, "2": 30})
    results = dict(seconds=seconds, seeds=[1, 2], full_seeds=False)
    assert pipeline.seconds_per_seed(results) == {"1": 10 + 500 + 300 + 200 + 150 + 60, "2": 810 + 210 + 160 + 30}
    seconds = {k: dict(v, **{"2": 1}) for k, v in seconds.items()}
    assert pipeline.seconds_per_seed(dict(results, seconds=seconds, full_seeds=True))["2"] == 6  # its own stages


@pytest.mark.parametrize("argv, message", [
    (["--seed", "1", "--seeds", "2", "3"], "not both"),
    (["--seeds", "1", "1"], "distinct"),
    (["--full-seeds"], "give --seeds"),
    (["--quick", "--smoke"], "one of them"),
    (["--plot", "runs/x", "--quick"], "--quick"),
    (["--plot", "runs/x", "--seed", "0"], "--seed"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        pipeline.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_with_two_seeds_and_no_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # CI has no matplotlib: the run must finish without it
    pipeline.main(["--smoke", "--seeds", "1", "2", "--work-dir", str(tmp_path / "work"),
                   "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["seeds"] == [1, 2] and not results["full_seeds"]
    assert set(results["policies"]["sft"]["0.01"]) == {"1"}  # one SFT policy and reward model, shared
    assert set(results["policies"]["ppo"]["0.7"]) == set(results["policies"]["dpo"]["0.01"]) == {"1", "2"}
    assert set(results["reward_model"]) == {"1"} and set(results["ppo_curves"]) == {"1", "2"}
    assert results["seconds"]["ppo"].keys() == {"1", "2"} and results["seconds"]["sft"].keys() == {"1"}
    assert results["judge_posts"] == pipeline.SETTINGS["smoke"]["judge_posts"]
    md = (tmp_path / "results" / "results.md").read_text()
    assert "| PPO | 2 | 0.7 |" in md and "| DPO - SFT | 0.01 |" in md and "Over seeds" in md
    assert "PPO against DPO at temperature 0.01: " in md and ", seed 2 " in md  # seed 2's whole pipeline
    assert not list((tmp_path / "results").glob("*.png"))
    assert "no plots: matplotlib is not installed" in out and "--plot" in out
    table = out.rstrip().split("\n")
    assert table[-1].startswith("| total (wall time) |") and table[-4].startswith("| PPO |")
    assert " (sd " in table[-4] and " ± " in table[-6]  # PPO: spread over 2 seeds; the one SFT: standard error


def test_plots_show_every_seed(tmp_path):
    pytest.importorskip("matplotlib")
    policies = {"sft": {t: {"1": metrics(0.3)} for t in pipeline.TEMPERATURES},
                "ppo": {t: {"1": metrics(0.8), "2": metrics(0.9)} for t in pipeline.TEMPERATURES},
                "dpo": {t: {"1": metrics(0.7), "2": metrics(0.6)} for t in pipeline.TEMPERATURES}}
    summary, _ = pipeline.summarize(policies, {"1": "1", "2": "1"})
    curves = dict(episode=[64, 128], scores=[0.1, 0.2], kl=[0.0, 0.1], validation_score=[0.2, 0.3],
                  gold_episode=[64], gold_win_rate=[0.5])
    assert pipeline.plot(dict(policies=policies, summary=summary, ppo_curves={"1": curves, "2": curves}), str(tmp_path))
    assert (tmp_path / "ppo_curves.png").stat().st_size > 0 and (tmp_path / "win_rate_by_stage.png").stat().st_size > 0
