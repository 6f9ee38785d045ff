import json
import os

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import offline_world as w

POST = (
    "my boyfriend broke my phone.\nthis happened last week. my sister sold my car.\n\n"
    "my dad lost my watch. i feel angry.\nshould i call the police?"
)


def test_perfect_summary_beats_hallucinating_one():
    perfect = "my boyfriend broke my phone. i feel angry. should i call the police?"
    hallucinating = "my boyfriend broke my phone. my mom stole my dog. i feel angry. should i call the police?"
    assert w.score(POST, perfect) == pytest.approx(4.0)
    assert w.score(POST, hallucinating) == pytest.approx(4.0 - 1.5)


def test_each_term_of_the_judge():
    assert w.score(POST, "my sister sold my car.") == pytest.approx(0.3)  # another true fact only
    assert w.score(POST, "my sister sold my car. my dad lost my watch. my dad lost my watch.") == pytest.approx(0.6)
    assert w.score(POST, "my boyfriend broke my phone. i feel sad and guilty.") == pytest.approx(2.0 - 2.0)
    assert w.score(POST, "should i move out?") == pytest.approx(-1.0)
    assert w.score(POST, "my boyfriend broke my phone.", ended=False) == pytest.approx(1.0)  # missing end
    long = "my boyfriend broke my phone. " + "it was late at night. " * 5  # 5 + 25 = 30 words: 12 over 18
    assert w.score(POST, long) == pytest.approx(2.0 - 0.15 * 12)


def test_main_fact_is_the_first_fact_even_after_a_filler():
    post = "this is my first post here. my mom hid my keys. my uncle fixed my bike. i feel sad. should i move out?"
    assert w.score(post, "my mom hid my keys.") == pytest.approx(2.0)
    assert w.score(post, "my uncle fixed my bike.") == pytest.approx(0.3)


def test_win_rate_counts_ties_half():
    posts = [POST] * 3
    good, bad = "my boyfriend broke my phone.", "my mom stole my dog."
    assert w.win_rate(posts, [good, bad, good], [bad, good, good]) == pytest.approx(0.5)
    assert w.win_rate(posts, [good] * 3, [good] * 3, ours_ended=[False] * 3) == 0.0
    with pytest.raises(ValueError, match="equally long"):
        w.win_rate(posts, [good], [good])


def test_world_loads_in_hub_schemas(world):
    sft = datasets.load_dataset(str(world / "tldr_sft"))
    assert set(sft) == {"train", "validation", "test"}
    assert sft["train"].column_names == ["id", "subreddit", "title", "post", "summary"]
    row = sft["train"][0]
    assert w.parse_facts(row["post"]) and not row["summary"].startswith(" ")
    assert any("\n" in r["post"] for r in sft["train"])

    preference = datasets.load_dataset(str(world / "tldr_preference"))
    assert set(preference) == {"train", "validation", "validation_cnndm"}
    row = preference["train"][0]
    assert set(row) == {"info", "summaries", "choice", "batch", "split", "extra"}
    assert set(row["info"]) == {"id", "post", "title", "subreddit"}
    assert len(row["summaries"]) == 2 and set(row["summaries"][0]) == {"text", "policy", "note"}
    assert all(s["text"].startswith(" ") for r in preference["train"] for s in r["summaries"])
    assert set(preference["train"]["choice"]) == {0, 1}
    assert 1 <= min(r["confidence"] for r in preference["train"]["extra"]) <= max(r["confidence"] for r in preference["train"]["extra"]) <= 9
    assert set(preference["validation"]["split"]) == {"valid1"}


def test_labels_are_noisy_like_labellers(world):
    stats = json.loads((world / "world.json").read_text())
    for split, agreement in stats["label_agreement_with_gold_judge"].items():
        assert 0.68 < agreement < 0.88, (split, agreement)
    assert 1.5 < stats["reference_gold_score"] < 3.2  # mediocre references: RLHF has headroom


def test_some_posts_need_truncation_at_small_query_lengths(world):
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    rows = datasets.load_dataset(str(world / "tldr_sft"), split="train")
    lengths = [len(tokenizer.encode(w.query_text(r))) for r in rows]
    assert max(lengths) > 128 > sorted(lengths)[len(lengths) // 2]


def test_tokenizer_and_model_are_pythia_like(world):
    tokenizer = AutoTokenizer.from_pretrained(str(world / "base_model"))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token is None
    model = AutoModelForCausalLM.from_pretrained(str(world / "base_model"))
    config = model.config
    assert config.model_type == "gpt_neox" and config.use_parallel_residual and not config.tie_word_embeddings
    assert config.vocab_size > len(tokenizer)  # room for [PAD] without resizing, like Pythia's 50304 rows
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_same_seed_writes_identical_files(world, tmp_path):
    w.build(str(tmp_path), size="tiny", seed=1, verbose=False)
    built = 0
    for folder, _, files in os.walk(tmp_path):  # every file the build writes (other tests add files to `world`)
        for name in files:
            b = os.path.join(folder, name)
            a = os.path.join(world, os.path.relpath(b, tmp_path))
            with open(a, "rb") as fa, open(b, "rb") as fb:
                assert fa.read() == fb.read(), a
            built += 1
    assert built >= 10  # parquet splits, world.json, the tokenizer and model files


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--size"):
        w.build(str(tmp_path), size="huge")
