"""benchmark/speed_vs_trl.py: the pure helpers behind the report's numbers (no TRL, no runs)."""

import sys

import pytest

import speed_vs_trl


def test_steady_eps_skips_the_warmup_update():
    # updates end at 10 s (warm-up), 12 s, 14 s, 16 s: 3 steady updates of 64 episodes in 6 s
    assert speed_vs_trl.steady_eps([10.0, 12.0, 14.0, 16.0], 64) == pytest.approx(32.0)
    assert speed_vs_trl.steady_eps([10.0, 12.0, 15.0], 32, warmup=2) == pytest.approx(32 / 3)


def test_steady_eps_needs_an_update_past_the_warmup():
    with pytest.raises(ValueError, match="at least 2 updates"):
        speed_vs_trl.steady_eps([10.0], 64)


def test_median_ratio_pairs_the_alternated_runs():
    assert speed_vs_trl.median_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    assert speed_vs_trl.median_ratio([4.0, 6.0], [2.0, 2.0]) == 2.5  # pairwise, then the median
    with pytest.raises(ValueError, match="as many runs"):
        speed_vs_trl.median_ratio([1.0], [1.0, 2.0])


def test_shares_leave_the_rest_to_other():
    s = speed_vs_trl.shares({"generation": 1.0, "scoring": 0.5, "training": 2.0}, 4.0)
    assert s == pytest.approx({"generation": 0.25, "scoring": 0.125, "training": 0.5, "other": 0.125})


def test_same_build_names_every_difference():
    ours = dict(python="3.11.7", torch="2.14.1+cu130", torch_cuda="13.0", transformers="5.24.0")
    assert speed_vs_trl.same_build(ours, dict(ours)) == []
    assert speed_vs_trl.same_build(ours, dict(ours, python="3.12.0")) == []  # the interpreter may differ
    theirs = dict(ours, torch="2.13.0+cpu", torch_cuda=None)
    assert speed_vs_trl.same_build(ours, theirs) == ["torch: ours '2.14.1+cu130', TRL '2.13.0+cpu'",
                                                     "torch_cuda: ours '13.0', TRL None"]


def test_phase_flops_by_hand():
    # 4 episodes of 10 + 6 tokens = 64 tokens; policy 1,000 matrix weights (2,000 FLOPs a token), scalar model 500 (1,000)
    c = dict(batch_size=4, query_length=10, response_length=6, num_ppo_epochs=2)
    flops = speed_vs_trl.phase_flops(c, 1000, 500)
    assert flops == dict(generation=64 * 2000, scoring=64 * (2000 + 2 * 1000), training=2 * 64 * 3 * (2000 + 1000))


def test_flops_table_rates_against_the_peak():
    comp = dict(flops=dict(generation=4e9, scoring=2e9, training=12e9),
                ours=[dict(parts=dict(generation=2.0, scoring=1.0, training=3.0))],
                trl=[dict(parts=dict(generation=4.0, scoring=1.0, training=6.0))])
    rows = speed_vs_trl.flops_table(comp, peak=10e9)
    assert rows[2] == "| generation | 4.0 | 2.00 | 20.0% | 1.00 | 10.0% |"
    assert rows[4] == "| training | 12.0 | 4.00 | 40.0% | 2.00 | 20.0% |"


def test_flops_table_adds_the_compiled_side_between_ours_and_trl():
    comp = dict(flops=dict(generation=4e9, scoring=2e9, training=12e9),
                ours=[dict(parts=dict(generation=2.0, scoring=1.0, training=3.0))],
                ours_compiled=[dict(parts=dict(generation=1.0, scoring=1.0, training=2.0)),
                               dict(parts=dict(generation=4.0, scoring=1.0, training=4.0))],  # median of 4 and 1 GFLOP/s
                trl=[dict(parts=dict(generation=4.0, scoring=1.0, training=6.0))])
    rows = speed_vs_trl.flops_table(comp, peak=10e9)
    assert rows[0].startswith("| phase | model GFLOP per update | ours GFLOP/s | ours % of peak | ours --compile GFLOP/s")
    assert rows[2] == "| generation | 4.0 | 2.00 | 20.0% | 2.50 | 25.0% | 1.00 | 10.0% |"


def run(eps, peak_mib, first, parts=(0.5, 0.25, 1.0)):
    parts = dict(zip(("generation", "scoring", "training"), parts))
    return dict(eps=eps, peak_mib=peak_mib, first_update_seconds=first, seconds_per_update=2.0, parts=parts,
                shares=speed_vs_trl.shares(parts, 2.0))


def test_report_gives_the_compiled_runs_their_ratio_and_compile_time():
    c = dict(size="tiny", query_length=128, response_length=53, batch_size=64, local_micro_batch_size=16,
             local_rollout_forward_batch_size=32, num_ppo_epochs=4, updates=5, threads=2)
    comp = dict(config=c, parameters=1000, ours=[run(30.0, 600, 2.0)], ours_compiled=[run(45.0, 700, 62.5)],
                trl=[run(20.0, 640, 3.0)], eps_ratio=1.5, memory_ratio=600 / 640, compiled_eps_ratio=2.25,
                compiled_memory_ratio=700 / 640)
    text = speed_vs_trl.report(["header"], [comp], [], dict(ours=400, trl=420))
    assert "| 1 | 45.0 | 20.0 | 2.25 | 700 | 1.09 | 62.5 | 60.5 | 2.00 | 25% / 12% / 50% / 12% |" in text
    assert "episodes per second 1.50x, peak memory 0.94x** (meets" in text
    assert "ours --compile/TRL: episodes per second 2.25x, peak memory 1.09x** (misses" in text  # more memory
    comp["ours_compiled"] = []
    assert "--compile" not in speed_vs_trl.report(["header"], [comp], [], dict(ours=400, trl=420))


def test_matmul_parameters_leave_out_the_input_embedding(world):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world / "base_model"))
    total = sum(p.numel() for p in model.parameters())
    vocab, hidden = model.get_input_embeddings().weight.shape
    policy, scalar = speed_vs_trl.matmul_parameters(str(world / "base_model"))
    assert policy == total - vocab * hidden  # untied: the LM head is a matrix product, the input table a lookup
    assert scalar == total - 2 * vocab * hidden + hidden


def test_run_measured_reports_the_run_s_own_peak_not_this_process_s(tmp_path):
    held = bytearray(600 * 2**20)  # this process: 600 MiB more resident (one write per page)
    held[::4096] = b"x" * len(held[::4096])
    grow = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('grown', flush=True)"
    rc, peak_mib, lines = speed_vs_trl.run_measured([sys.executable, "-c", grow], None, str(tmp_path / "run.log"))
    assert rc == 0 and [line for _, line in lines] == ["grown\n"]
    assert 200 < peak_mib < 400, peak_mib  # its 200 MiB and an interpreter; floored at 600+ if exec'd from here
    rc, _, _ = speed_vs_trl.run_measured([sys.executable, "-c", "raise SystemExit(3)"], None, str(tmp_path / "x.log"))
    assert rc == 3
    del held
