"""Shared fixtures: the tiny offline world, built once per test session; offline mode for every test."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmark"))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The test-sized offline world: {out_dir}/tldr_sft, tldr_preference, base_model."""
    import offline_world

    out_dir = tmp_path_factory.mktemp("world")
    offline_world.build(str(out_dir), size="tiny", seed=1, verbose=False)
    return out_dir


@pytest.fixture(scope="session")
def reward_model(world, tmp_path_factory):
    """A reward model on the tiny base model (random head) with the policy's tokenizer: enough to exercise every code
    path of ppo_tldr.py. Kept outside the world's folder, which must hold only what offline_world.build writes."""
    import torch

    from ppo_tldr import load_tokenizer
    from value_head import ScalarModel

    path = tmp_path_factory.mktemp("reward_model")
    torch.manual_seed(0)
    ScalarModel.from_backbone(str(world / "base_model")).save_pretrained(str(path))
    load_tokenizer(str(world / "base_model"), "--sft-model-path").save_pretrained(str(path))
    return path
