# See README.md "value_head.py": the scalar head shared by reward_model.py (producer) and ppo_tldr.py (consumer).
"""A transformer backbone with a scalar head: the reward model and PPO's value model.

    model = ScalarModel.from_pretrained("path/or/hub-id")     # this format, or AutoModelForSequenceClassification
    reward_logits, scores, sequence_lengths = get_reward(model, query_responses, pad_token_id, context_length)

Saved as a plain folder: the backbone with its own `save_pretrained` (config.json + weights, loadable by AutoModel),
plus `value_head.safetensors` (the head) and `value_head.json` (hidden size and the normalisation bias [D15]).
"""

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


def scalar_head(hidden_size):
    """Linear(hidden, 1) with weight ~ N(0, 1/sqrt(hidden + 1)) and bias 0 [D11]."""
    head = nn.Linear(hidden_size, 1)
    nn.init.normal_(head.weight, std=1 / (hidden_size + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


class ScalarModel(nn.Module):
    """Backbone + scalar head; outputs one scalar per token, minus the stored normalisation bias [D15]."""

    def __init__(self, backbone, bias=0.0):
        super().__init__()
        self.backbone = backbone
        self.scalar_head = scalar_head(backbone.config.hidden_size)
        self.bias = bias  # a float saved in value_head.json; reward_model.py sets it after training [D15]

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # (B, T, d)
        return self.scalar_head(hidden).squeeze(-1) - self.bias  # (B, T)

    def save_pretrained(self, folder, state_dict=None):
        """Backbone (save_pretrained) + head + bias. `state_dict`: this model's full state dict, when the module's own
        parameters are not whole (sharded with FSDP)."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        os.makedirs(folder, exist_ok=True)
        self.backbone.save_pretrained(folder, state_dict={k[len("backbone."):]: v for k, v in state_dict.items()
                                                          if k.startswith("backbone.")})
        save_file({k[len("scalar_head."):]: v.detach().contiguous().cpu() for k, v in state_dict.items()
                   if k.startswith("scalar_head.")}, os.path.join(folder, HEAD_WEIGHTS))
        with open(os.path.join(folder, HEAD_CONFIG), "w") as f:
            json.dump({"hidden_size": self.config.hidden_size, "bias": float(self.bias)}, f, indent=2)

    @classmethod
    def from_backbone(cls, path, **kwargs):
        """A fresh head on a pretrained backbone (e.g. the SFT policy, whose LM head is dropped) [D10, D11]."""
        return cls(AutoModel.from_pretrained(path, **kwargs))

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load this folder format, or an AutoModelForSequenceClassification with num_labels=1 (its `score`
        becomes the head, bias 0 unless its config records one). `kwargs` go to the transformers loader."""
        if os.path.isdir(path) and os.path.exists(os.path.join(path, HEAD_CONFIG)):
            with open(os.path.join(path, HEAD_CONFIG)) as f:
                head_config = json.load(f)
            model = cls(AutoModel.from_pretrained(path, **kwargs), bias=head_config["bias"])
            model.scalar_head.load_state_dict(load_file(os.path.join(path, HEAD_WEIGHTS)))
            return model
        config = AutoConfig.from_pretrained(path)
        if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            raise ValueError(f"{path} is neither a value_head folder (no {HEAD_CONFIG}) nor a "
                             f"*ForSequenceClassification checkpoint (architectures: {config.architectures})")
        if config.num_labels != 1:
            raise ValueError(f"{path} is a sequence classifier with num_labels={config.num_labels}; a reward model needs 1")
        classifier = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        model = cls(classifier.base_model, bias=getattr(config, "bias", 0.0))
        score = classifier.score
        model.scalar_head.weight.data.copy_(score.weight.data)
        if score.bias is not None:
            model.scalar_head.bias.data.copy_(score.bias.data)
        return model


def first_true_indices(bools, dtype=torch.long):
    """Index of the first True in each row of a (B, T) bool tensor; T where a row has none."""
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def get_reward(model, query_responses, pad_token_id, context_length):
    """Per-token outputs (B, T) and the score read at the last non-pad token of each response [D12].

    `query_responses` is a left-padded query of `context_length` tokens followed by a right-padded response
    (context_length=0 for a right-padded sequence). Position ids come from the attention mask, so left padding
    does not shift positions.
    """
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    reward_logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)  # (B, T)
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    scores = reward_logits[torch.arange(reward_logits.size(0), device=reward_logits.device), sequence_lengths]  # (B,)
    return reward_logits, scores, sequence_lengths
