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
    with pytest.raises(ValueError, match="neither a value_head folder"):
        ScalarModel.from_pretrained(str(tmp_path))
