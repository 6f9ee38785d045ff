"""benchmark/gpu_check.py: its FLOP and MFU arithmetic, the Pythia-1B shapes, and the whole check at --tiny on CPU."""

import json

import pytest
import torch

import gpu_check
from conftest import run_ok


def test_flops_and_mfu_by_hand():
    assert gpu_check.flops(1_000, 10, backward=False) == 20_000  # 2 N per token
    assert gpu_check.flops(1_000, 10, backward=True) == 60_000  # 6 N per token
    # 6e14 FLOPs in 2 s on a 1000 TFLOP/s GPU: 3e14 FLOP/s of 1e15 = 30%
    assert gpu_check.mfu(6e14, 2.0, 1000.0) == pytest.approx(0.3)
    assert gpu_check.mfu(6e14, 2.0, None) is None


def test_peak_tflops_by_gpu_name():
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA GH200 480GB") == 989.0  # the longest matching name
    assert gpu_check.peak_tflops("Some Future GPU") is None
    assert gpu_check.peak_tflops("NVIDIA H200", override=500.0) == 500.0


def test_steady_window_skips_the_first_update():
    assert gpu_check.steady_window([10.0, 12.0, 15.0]) == (2, 5.0)
    with pytest.raises(ValueError, match="at least 2 updates"):
        gpu_check.steady_window([10.0])


def test_the_models_have_pythia_1b_parameter_count():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(GPTNeoXConfig(**gpu_check.PYTHIA_1B))
    assert sum(p.numel() for p in model.parameters()) == 1_011_781_632  # Pythia-1B's published total


def test_word_level_tokenizer_has_pythias_shape(tmp_path):
    from ppo_tldr import load_tokenizer

    tokenizer = gpu_check.word_level_tokenizer(["my dog lost my keys.", "TL;DR: my dog"], 50277)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path), "--sft-model-path")  # as the scripts load it: [PAD] added
    assert len(loaded) == 50278 and loaded.eos_token_id == 0 and loaded.pad_token_id == 50277
    ids = loaded.encode("my dog lost my keys.")
    assert len(ids) == 6 and ids[0] == ids[3] and 1 not in ids  # word-level, no unknown word
    with pytest.raises(ValueError, match="more than the tokenizer's 3 tokens"):
        gpu_check.word_level_tokenizer(["a b c"], 3)


@pytest.mark.slow
def test_tiny_check_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "check"
    run_ok(gpu_check.__file__, "--out-dir", str(out), "--tiny", "--peak-tflops", "0.1", timeout=300)
    report = json.loads((out / "gpu_check.json").read_text())
    for stage in ["ppo", "sft", "reward_model", "dpo"]:
        r = report["results"][stage]
        assert r["sequences_per_second"] > 0 and r["tokens_per_second"] > r["sequences_per_second"]
        assert 0 < r["mfu"] < 1 and r["peak_rss_mib"] > 0
        assert len(r["update_times"]) == 3
    assert set(report["results"]["ppo"]["time_split_s"]) == {"generation", "scoring", "training", "other"}
    markdown = (out / "gpu_check.md").read_text()
    assert "| ppo |" in markdown and "| dpo |" in markdown and "MFU by phase" in markdown
    assert not (out / "runs" / "ppo" / "model.safetensors").exists()  # the saved models are removed
