import json

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
