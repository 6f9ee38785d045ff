import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXModel

from value_head import ScalarModel, first_true_indices, get_reward, scalar_head

PAD = 99


def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)
    return GPTNeoXModel(config).eval()


def test_head_init_statistics():
    torch.manual_seed(0)
    head = scalar_head(4095)
    assert head.weight.shape == (1, 4095)
    assert head.weight.std().item() == pytest.approx(1 / 4096**0.5, rel=0.05)  # [D11]
    assert abs(head.weight.mean().item()) < 4 / 4096  # 4 standard errors of the mean of 4095 draws
    assert torch.all(head.bias == 0)


def test_first_true_indices():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_readout_index_left_and_right_padded():
    model = ScalarModel(tiny_backbone())
    # query of 3 tokens (left-padded), response of 4 tokens (right-padded)
    qr = torch.tensor([
        [PAD, 5, 6, 7, 8, 0, PAD],   # response "7 8 0" -> last non-pad at 5
        [4, 5, 6, 7, 8, 9, 0],       # no pad at all -> last index 6
        [PAD, PAD, 6, 0, PAD, PAD, PAD],  # response "0" -> index 3
    ])
    _, scores, lengths = get_reward(model, qr, PAD, context_length=3)
    assert lengths.tolist() == [5, 6, 3]
    # context_length 0: a right-padded sequence
    _, _, lengths = get_reward(model, torch.tensor([[4, 5, 0, PAD, PAD]]), PAD, context_length=0)
    assert lengths.tolist() == [2]


def test_left_padded_and_unpadded_scores_agree():
    model = ScalarModel(tiny_backbone())
    with torch.no_grad():
        _, unpadded, _ = get_reward(model, torch.tensor([[5, 6, 7, 8, 0]]), PAD, context_length=2)
        _, padded, _ = get_reward(model, torch.tensor([[PAD, PAD, PAD, 5, 6, 7, 8, 0, PAD]]), PAD, context_length=5)
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)


def test_bias_is_subtracted_and_round_trips(tmp_path):
    model = ScalarModel(tiny_backbone())
    qr = torch.tensor([[5, 6, 7, 0]])
    with torch.no_grad():
        _, before, _ = get_reward(model, qr, PAD, 0)
        model.bias = 0.75
        _, after, _ = get_reward(model, qr, PAD, 0)
    torch.testing.assert_close(after, before - 0.75)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "value_head.json").read_text())["bias"] == 0.75
    loaded = ScalarModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        _, reloaded, _ = get_reward(loaded, qr, PAD, 0)
    torch.testing.assert_close(reloaded, after)


def test_loads_a_sequence_classification_checkpoint(tmp_path):
    backbone = tiny_backbone()
    config = backbone.config
    config.num_labels, config.pad_token_id = 1, PAD
    classifier = AutoModelForSequenceClassification.from_config(config)
    torch.nn.init.normal_(classifier.score.weight)
    classifier.save_pretrained(str(tmp_path))
    model = ScalarModel.from_pretrained(str(tmp_path)).eval()
    qr = torch.tensor([[5, 6, 7, 8, 0]])
    with torch.no_grad():
        expected = classifier.eval()(input_ids=qr).logits[0, 0]
        _, scores, _ = get_reward(model, qr, PAD, 0)
    torch.testing.assert_close(scores[0], expected, atol=1e-5, rtol=1e-5)
    assert model.bias == 0.0


def test_refuses_a_plain_language_model(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_backbone().config).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="none of the formats tried") as error:
        ScalarModel.from_pretrained(str(tmp_path))
    message = str(error.value)
    assert all(f in message for f in ["value_head folder", "ScalarModel", "ForSequenceClassification"])
    assert "GPTNeoXForCausalLM" in message and "model.safetensors" in message and "config.json" in message


# ---- the N+ reference's ScalarModel format, as its save_pretrained wrote it (transformers 4.33, pickled weights) ----
STALE = "/admin/home-costa/summarize_from_feedback_details/models/EleutherAI/pythia-1b-deduped/sft_model_44413"


def reference_config(bias=0.5):
    """config.json of the reference's ScalarModelConfig: model_type "", the backbone's config nested with the
    training machine's path, and the backbone config keys of its transformers version (rotary_pct, torch_dtype)."""
    base = dict(_name_or_path=STALE, architectures=["GPTNeoXForCausalLM"], attention_dropout=0.0, bos_token_id=0,
                classifier_dropout=0.1, eos_token_id=0, hidden_act="gelu", hidden_dropout=0.0, hidden_size=32,
                initializer_range=0.02, intermediate_size=64, layer_norm_eps=1e-5, max_position_embeddings=64,
                model_type="gpt_neox", num_attention_heads=2, num_hidden_layers=2, rope_scaling=None,
                rotary_emb_base=10000, rotary_pct=0.25, tie_word_embeddings=False, torch_dtype="bfloat16",
                transformers_version="4.33.2", use_cache=True, use_parallel_residual=True, vocab_size=128)
    config = dict(architectures=["ScalarModel"], base_config=base, base_model=STALE, hidden_size=32,
                  model_type="", torch_dtype="bfloat16", transformers_version="4.33.2")
    if bias is not None:
        config["bias"] = bias
    return config


def save_reference(folder, backbone, head, bias=0.5, dtype=torch.float32, shards=0):
    """The reference's layout: lm_backbone.* + scalar_head.*, in pytorch_model.bin (torch.save of the state dict);
    `shards` > 0 writes model-0000k-of-0000n.safetensors files and their model.safetensors.index.json instead."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(reference_config(bias), indent=2))
    state = {f"lm_backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"scalar_head.{k}": v for k, v in head.state_dict().items()})
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    if not shards:
        torch.save(state, folder / "pytorch_model.bin")
        return
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def by_hand(backbone, head, bias, ids):
    """Score at the last token: the backbone's last hidden state -> head weight . h + head bias - bias."""
    with torch.no_grad():
        h = backbone(input_ids=ids).last_hidden_state[:, -1]  # (B, d)
        return h @ head.weight[0] + head.bias[0] - bias


def reference_parts(dtype=torch.float32):
    backbone, head = tiny_backbone(seed=3), torch.nn.Linear(32, 1)
    torch.nn.init.normal_(head.bias)
    if dtype != torch.float32:  # the by-hand model holds exactly the stored (rounded) values
        backbone.to(dtype).float(), head.to(dtype).float()
    return backbone, head


@pytest.mark.parametrize("dtype, shards", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float16, 0),
                                           (torch.float32, 2), (torch.bfloat16, 3)])
def test_loads_the_reference_scalar_model(tmp_path, dtype, shards):
    backbone, head = reference_parts(dtype)
    save_reference(tmp_path / "rm", backbone, head, bias=0.5, dtype=dtype, shards=shards)
    assert not (tmp_path / "rm" / "pytorch_model.bin").exists() if shards else True
    model = ScalarModel.from_pretrained(str(tmp_path / "rm")).eval()
    assert model.bias == 0.5 and model.has_stored_bias
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored in bf16/fp16: loaded into fp32
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    with torch.no_grad():
        _, scores, _ = get_reward(model, ids, PAD, 0)
    torch.testing.assert_close(scores, by_hand(backbone, head, 0.5, ids), atol=1e-5, rtol=1e-5)


def test_reference_format_never_follows_the_stale_path(tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained called: {args}")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)  # the backbone must come from the nested config
    save_reference(tmp_path, *reference_parts())
    assert ScalarModel.from_pretrained(str(tmp_path)).backbone.config.name_or_path != STALE


def test_reference_format_without_a_bias_is_not_stored(tmp_path):
    save_reference(tmp_path, *reference_parts(), bias=None)
    model = ScalarModel.from_pretrained(str(tmp_path))
    assert model.bias == 0.0 and not model.has_stored_bias


def classifier_folder(folder, num_labels=1, bias=None, pad=True):
    """A GPT-NeoX sequence classifier (its score layer has no bias term), like the hub's converted reward model."""
    config = tiny_backbone().config
    config.num_labels = num_labels
    config.pad_token_id = PAD if pad else None
    if bias is not None:
        config.bias = bias
    classifier = AutoModelForSequenceClassification.from_config(config)
    torch.nn.init.normal_(classifier.score.weight)
    classifier.save_pretrained(str(folder))
    return classifier


def test_sequence_classifier_bias_is_stored_only_in_its_config(tmp_path):
    classifier_folder(tmp_path / "none")
    classifier_folder(tmp_path / "some", bias=0.25)
    plain, biased = (ScalarModel.from_pretrained(str(tmp_path / n)) for n in ["none", "some"])
    assert (plain.bias, plain.has_stored_bias) == (0.0, False)
    assert (biased.bias, biased.has_stored_bias) == (0.25, True)
    assert ScalarModel(tiny_backbone()).bias == 0.0
    model = ScalarModel(tiny_backbone())
    model.save_pretrained(str(tmp_path / "ours"))
    assert ScalarModel.from_pretrained(str(tmp_path / "ours")).has_stored_bias  # value_head.json always holds it


def test_bad_reward_model_folders_name_the_file_and_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    classifier_folder(tmp_path / "two", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2; a reward model has 1"):
        ScalarModel.from_pretrained(str(tmp_path / "two"))
    classifier_folder(tmp_path / "headless")
    weights = load_file(str(tmp_path / "headless" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, str(tmp_path / "headless" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors.*missing \(1\): score.weight"):
        ScalarModel.from_pretrained(str(tmp_path / "headless"))
    backbone, head = reference_parts()
    save_reference(tmp_path / "wide", backbone, torch.nn.Linear(48, 1))  # a head wider than the config's hidden size
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*wrong shape \(1\): scalar_head.weight \(1, 48\), expected \(1, 32\)"):
        ScalarModel.from_pretrained(str(tmp_path / "wide"))
    save_reference(tmp_path / "renamed", backbone, head)
    state = torch.load(tmp_path / "renamed" / "pytorch_model.bin", weights_only=True)
    torch.save({k.replace("lm_backbone.", "model."): v for k, v in state.items()}, tmp_path / "renamed" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \(27\): lm_backbone.embed_in.weight") as error:
        ScalarModel.from_pretrained(str(tmp_path / "renamed"))
    assert "unexpected (27): model.embed_in.weight" in str(error.value)
    ours = tmp_path / "ours"
    ScalarModel(tiny_backbone()).save_pretrained(str(ours))
    (ours / "value_head.safetensors").unlink()
    with pytest.raises(ValueError, match=r"value_head.safetensors.*missing \(2\): scalar_head.weight, scalar_head.bias"):
        ScalarModel.from_pretrained(str(ours))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"none of the formats tried.*it holds \[\]"):
        ScalarModel.from_pretrained(str(tmp_path / "empty"))
