# See benchmark/README.md "The tiny offline TL;DR world" for what this world is and why it stands in for the real one.
"""A tiny, deterministic, offline stand-in for TL;DR summarisation: data, gold judge, tokenizer and base model.

    python benchmark/offline_world.py --out-dir /tmp/world --size tiny --seed 1

writes
    /tmp/world/tldr_sft/         like vwxyzjn/summarize_from_feedback_tldr_3_filtered (train / validation / test)
    /tmp/world/tldr_preference/  like the OpenAI summarize_from_feedback comparisons (train / validation /
                                 validation_cnndm), raw columns info, summaries, choice, batch, split, extra
    /tmp/world/base_model/       a random GPT-NeoX (Pythia-like) model + a locally trained byte-level BPE tokenizer
each loadable with `datasets.load_dataset(folder)` or the transformers Auto classes, exactly as the hub ids are.

Posts are Reddit-like stories made of template sentences: 2-3 facts "my {person} {action} my {object}." (the first
is the main fact, echoed by the title), filler sentences, a feeling "i feel {feeling}." and a question last.
`score(post, summary)` is the gold judge that stands in for the paper's GPT judge; `win_rate` is the paper's metric.
"""

import argparse
import json
import math
import os
import random
import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary of the world (about 150 distinct words in all)
# ---------------------------------------------------------------------------------------------------------------
PERSONS = ["boyfriend", "girlfriend", "roommate", "brother", "sister", "mom", "dad", "boss",
           "neighbor", "friend", "cousin", "landlord", "coworker", "husband", "wife", "uncle"]
ACTIONS = ["broke", "lost", "sold", "borrowed", "hid", "painted", "stole", "fixed",
           "washed", "burned", "returned", "scratched"]
OBJECTS = ["phone", "car", "laptop", "bike", "guitar", "couch", "camera", "watch",
           "wallet", "keys", "jacket", "ring", "tv", "dog"]
FEELINGS = ["angry", "sad", "confused", "betrayed", "anxious", "guilty",
            "relieved", "embarrassed", "lonely", "hopeful"]
# Each question is identified by its key phrase (what follows "should i").
QUESTIONS = ["break up with them", "ask for the money back", "call the police", "move out",
             "talk to them", "just let it go", "tell my parents", "apologize first",
             "get a lawyer", "buy a new one"]
FILLERS = ["this happened last week.", "we have known each other for years.", "it was a rainy day.",
           "i work from home most days.", "we live in a small town.", "it is a long story.",
           "nobody else was around.", "i was at work at the time.", "we had just moved in.",
           "this is my first post here.", "sorry for the formatting.", "i am on mobile.",
           "everything was fine until then.", "it was late at night.", "we talked about it once.",
           "things have been weird lately."]
SUBREDDITS = ["relationships", "relationship_advice", "tifu", "legaladvice", "personalfinance",
              "roommates", "offmychest", "AskReddit"]
TITLES = ["{fact}", "[{age} {sex}] {fact} and i do not know what to do", "help: {fact}", "{fact}, what now?",
          "so {fact}"]
EOS_TOKEN = "<|endoftext|>"

FACT_RE = re.compile(r"\bmy (\w+) (\w+) my (\w+)\b")
FEELING_RE = re.compile(r"\b(" + "|".join(FEELINGS) + r")\b")


@dataclass(frozen=True)
class Size:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    sft_splits: tuple  # (train, validation, test) posts
    preference_splits: tuple  # (train, validation, validation_cnndm) pairs
    rotary_pct: float = 0.25  # share of each head's dimensions that rotary embeddings rotate (Pythia's 0.25)
    long_post_prob: float = 0.15  # share of posts with 6-12 more fillers, over the query length
    num_fillers: tuple = (1, 3)  # the fewest and most filler sentences of a post


SIZES = {
    # ~190k parameters: the test suite's world, built in seconds.
    "tiny": Size(64, 2, 2, (512, 64, 64), (512, 128, 32)),
    # ~1M parameters: the benchmark's world (sft.py -> reward_model.py -> ppo_tldr.py / dpo.py in ~41 min on 2 cores).
    "small": Size(128, 4, 4, (20_000, 1_000, 1_000), (20_000, 2_000, 200)),
    # ~200k parameters on 30k posts: the quick pipeline (pipeline.py --quick, ~6 min on 2 cores). 4 heads of 16 dims
    # with rotary on all of them, so that SFT learns to copy the post's main fact; 500 validation pairs for the
    # accuracies of the reward model and DPO. Shorter posts (1-2 fillers, 3% long ones) make every stage cheaper.
    "quick": Size(64, 2, 4, (30_000, 1_000, 1_000), (10_000, 500, 100), rotary_pct=1.0, long_post_prob=0.03,
                  num_fillers=(1, 2)),
}


# ---------------------------------------------------------------------------------------------------------------
# Gold judge
# ---------------------------------------------------------------------------------------------------------------
def parse_facts(text):
    """(person, action, object) triples written as "my {person} {action} my {object}", in order of appearance."""
    return [m for m in FACT_RE.findall(text.lower()) if m[0] in PERSONS and m[1] in ACTIONS and m[2] in OBJECTS]


def parse_feelings(text):
    return set(FEELING_RE.findall(text.lower()))


def parse_questions(text):
    text = text.lower()
    return {q for q in QUESTIONS if "should i " + q in text}


def score(post, summary, ended=True):
    """Deterministic gold score of `summary` for `post`; `ended` says whether the summary ended with EOS.

    +2.0 main fact (the post's first), +0.3 per other true fact (at most 2), -1.5 per fact not in the post,
    +1.0 the post's feeling, -1.0 per other feeling, +1.0 the post's question, -1.0 per other question,
    -0.15 per word over 18, -1.0 without an end. An ideal summary scores about 4.0.
    """
    post_facts = parse_facts(post)
    summary_facts = set(parse_facts(summary))
    main = post_facts[0] if post_facts else None
    s = 0.0
    if main in summary_facts:
        s += 2.0
    s += 0.3 * min(2, len(summary_facts & (set(post_facts) - {main})))
    s -= 1.5 * len(summary_facts - set(post_facts))
    post_feelings, post_questions = parse_feelings(post), parse_questions(post)
    for feeling in parse_feelings(summary):
        s += 1.0 if feeling in post_feelings else -1.0
    for question in parse_questions(summary):
        s += 1.0 if question in post_questions else -1.0
    s -= 0.15 * max(0, len(summary.split()) - 18)
    if not ended:
        s -= 1.0
    return s


def win_rate(posts, ours, reference, ours_ended=None, reference_ended=None):
    """Share of posts where the judge prefers `ours` over `reference` (ties count half), as the paper reports."""
    if not (len(posts) == len(ours) == len(reference)) or not posts:
        raise ValueError(f"win_rate needs equally long, non-empty lists, got {len(posts)}, {len(ours)}, {len(reference)}")
    ours_ended = ours_ended or [True] * len(posts)
    reference_ended = reference_ended or [True] * len(posts)
    wins = 0.0
    for post, a, b, a_end, b_end in zip(posts, ours, reference, ours_ended, reference_ended):
        sa, sb = score(post, a, a_end), score(post, b, b_end)
        wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return wins / len(posts)


# ---------------------------------------------------------------------------------------------------------------
# Posts and writers
# ---------------------------------------------------------------------------------------------------------------
def fact_text(fact):
    return f"my {fact[0]} {fact[1]} my {fact[2]}"


def random_fact(rng):
    return (rng.choice(PERSONS), rng.choice(ACTIONS), rng.choice(OBJECTS))


def make_post(rng, long_post_prob=0.15, num_fillers=(1, 3)):
    """One post: dict(subreddit, title, post) plus its hidden structure (facts, feeling, question)."""
    facts = []
    while len(facts) < rng.choice([2, 3]):
        fact = random_fact(rng)
        if all(fact[0] != f[0] and fact[2] != f[2] for f in facts):
            facts.append(fact)
    feeling, question = rng.choice(FEELINGS), rng.choice(QUESTIONS)
    fillers = rng.sample(FILLERS, rng.randint(*num_fillers))
    body = [fact_text(f) + "." for f in facts[1:]] + fillers
    rng.shuffle(body)
    sentences = [fact_text(facts[0]) + "."] + body
    if rng.random() < 0.3:  # an opening filler: the main fact is the first *fact*, not the first sentence
        sentences.insert(0, sentences.pop(sentences.index(fillers[0])))
    sentences += [f"i feel {feeling}.", f"should i {question}?"]
    if rng.random() < long_post_prob:  # long posts, so that the newline truncation rule [D2.2] is needed
        sentences[-1:-1] = [rng.choice(FILLERS) for _ in range(rng.randint(6, 12))]
    post = sentences[0]
    for sentence in sentences[1:]:
        post += rng.choice([" ", " ", " ", "\n", "\n\n"]) + sentence
    title = rng.choice(TITLES).format(fact=fact_text(facts[0]), age=rng.randint(18, 45), sex=rng.choice("MF"))
    return dict(subreddit=rng.choice(SUBREDDITS), title=title, post=post,
                facts=facts, feeling=feeling, question=question, fillers=fillers)


# Probabilities of (main fact, another true fact, feeling, question, a wrong detail, a filler sentence).
WRITERS = {
    "human": (0.85, 0.20, 0.45, 0.35, 0.15, 0.30),
    "careful": (0.97, 0.30, 0.80, 0.75, 0.03, 0.05),
    "sloppy": (0.50, 0.30, 0.30, 0.20, 0.35, 0.60),
}


def write_summary(rng, p, writer):
    """A summary of post structure `p` by `writer` ("perturbed" = a human summary with one thing changed)."""
    if writer == "perturbed":
        summary = write_summary(rng, p, "human")
        wrong_feeling = rng.choice([f for f in FEELINGS if f != p["feeling"]])
        if p["feeling"] in summary and rng.random() < 0.5:
            return summary.replace(p["feeling"], wrong_feeling)
        wrong = fact_text(random_fact(rng))
        return summary.replace(fact_text(p["facts"][0]), wrong, 1) if rng.random() < 0.5 else summary + f" {wrong}."
    main, other, feeling, question, wrong, filler = WRITERS[writer]
    parts = []
    if rng.random() < main:
        parts.append(fact_text(p["facts"][0]) + ".")
    for fact in p["facts"][1:]:
        if rng.random() < other:
            parts.append(fact_text(fact) + ".")
    if rng.random() < wrong:
        parts.insert(rng.randint(0, len(parts)), fact_text(random_fact(rng)) + ".")
    if rng.random() < filler:
        parts.insert(rng.randint(0, len(parts)), rng.choice(p["fillers"]))
    if rng.random() < feeling:
        parts.append(f"i feel {p['feeling']}.")
    if rng.random() < question:
        parts.append(f"should i {p['question']}?")
    if writer == "sloppy" and rng.random() < 0.3:  # rambling
        parts += rng.sample(FILLERS, 3)
    if not parts:
        parts.append(fact_text(p["facts"][0]) + ".")
    return " ".join(parts)


def post_id(rng):
    return "t3_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))


def make_sft_split(rng, n, **post_shape):
    rows = []
    for _ in range(n):
        p = make_post(rng, **post_shape)
        rows.append(dict(id=post_id(rng), subreddit=p["subreddit"], title=p["title"], post=p["post"],
                         summary=write_summary(rng, p, "human")))
    return rows


def make_preference_split(rng, n, split, batches, temperature, **post_shape):
    """Pairs of summaries of one post labelled through Bradley-Terry on the gold score (noisy, like labellers)."""
    rows = []
    for _ in range(n):
        p = make_post(rng, **post_shape)
        texts, writers = [], []
        while len(texts) < 2:
            writer = rng.choices(["careful", "human", "sloppy", "perturbed"], [0.25, 0.35, 0.2, 0.2])[0]
            text = write_summary(rng, p, writer)
            if text not in texts:
                texts.append(text)
                writers.append(writer)
        s0, s1 = score(p["post"], texts[0]), score(p["post"], texts[1])
        p0 = 1.0 / (1.0 + math.exp(-(s0 - s1) / temperature))  # P(labeller prefers summary 0)
        rows.append(dict(
            info=dict(id=post_id(rng), post=p["post"], title=p["title"], subreddit=p["subreddit"]),
            summaries=[dict(text=" " + t, policy=w, note="") for t, w in zip(texts, writers)],  # OpenAI texts begin with a space
            choice=0 if rng.random() < p0 else 1,
            batch=rng.choice(batches),
            split=split,
            extra=dict(confidence=min(9, 1 + round(16 * abs(p0 - 0.5)))),  # 1..9 like the labellers' scale
        ))
    return rows


def label_agreement(rows):
    """Share of labels that agree with the noiseless gold judge (pairs the judge scores equal count half)."""
    agree = 0.0
    for row in rows:
        s = [score(row["info"]["post"], x["text"]) for x in row["summaries"]]
        agree += 0.5 if s[0] == s[1] else float((s[0] > s[1]) == (row["choice"] == 0))
    return agree / len(rows)


# ---------------------------------------------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------------------------------------------
def write_parquet_splits(folder, splits):
    """Hub layout (data/{split}-00000-of-00001.parquet), so `datasets.load_dataset(folder)` finds the splits."""
    import datasets

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for name, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(os.path.join(folder, "data", f"{name}-00000-of-00001.parquet"))


def train_tokenizer(texts, vocab_size=2000):
    """A byte-level BPE tokenizer like Pythia's: `<|endoftext|>` is BOS/EOS/UNK, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN)


def make_base_model(size, vocab_size, seed):
    """A randomly initialised Pythia-like GPT-NeoX: rotary, parallel residual, untied embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=size.hidden_size, num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads, intermediate_size=4 * size.hidden_size,
        max_position_embeddings=2048, rotary_pct=size.rotary_pct, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def query_text(row):
    return f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: {row['post']}\n\nTL;DR:"


def build(out_dir, size="tiny", seed=1, temperature=1.25, verbose=True):
    """Write tldr_sft/, tldr_preference/ and base_model/ under `out_dir`; return the label agreement rate."""
    if size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    rng, shape = random.Random(seed), dict(long_post_prob=s.long_post_prob, num_fillers=s.num_fillers)
    sft = {name: make_sft_split(rng, n, **shape) for name, n in zip(["train", "validation", "test"], s.sft_splits)}
    preference = {name: make_preference_split(rng, n, split, [f"batch{i}" for i in batches], temperature, **shape)
                  for name, n, split, batches in zip(["train", "validation", "validation_cnndm"], s.preference_splits,
                                                     ["train", "valid1", "valid2"], [range(3, 11), range(11, 14), ["0_cnndm"]])}
    write_parquet_splits(os.path.join(out_dir, "tldr_sft"), sft)
    write_parquet_splits(os.path.join(out_dir, "tldr_preference"), preference)

    texts = [query_text(r) + " " + r["summary"] + EOS_TOKEN for rows in sft.values() for r in rows]
    texts += [query_text(r["info"]) + x["text"] for rows in preference.values() for r in rows for x in r["summaries"]]
    tokenizer = train_tokenizer(texts)
    vocab_size = 128 * math.ceil((len(tokenizer) + 1) / 128)  # padded like Pythia's (room for the [PAD] token)
    model = make_base_model(s, vocab_size, seed)
    model.save_pretrained(os.path.join(out_dir, "base_model"))
    tokenizer.save_pretrained(os.path.join(out_dir, "base_model"))

    agreement = {name: label_agreement(rows) for name, rows in preference.items()}
    stats = dict(
        size=size, seed=seed, tokenizer_vocab=len(tokenizer), model_vocab=vocab_size,
        parameters=sum(p.numel() for p in model.parameters()),
        sft_rows={k: len(v) for k, v in sft.items()}, preference_rows={k: len(v) for k, v in preference.items()},
        reference_gold_score=sum(score(r["post"], r["summary"]) for r in sft["validation"]) / len(sft["validation"]),
        label_agreement_with_gold_judge=agreement,
    )
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(stats, f, indent=2)
    if verbose:
        print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True, help="folder to write tldr_sft/, tldr_preference/, base_model/ into")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES),
                        help="tiny (tests), quick (the quick pipeline) or small (benchmark)")
    parser.add_argument("--seed", type=int, default=1, help="seed: the same seed writes byte-identical files")
    parser.add_argument("--label-temperature", type=float, default=1.25,
                        help="Bradley-Terry temperature of the labels (higher = noisier)")
    cli = parser.parse_args()
    build(cli.out_dir, cli.size, cli.seed, cli.label_temperature)
