# See README.md "value_head.py": the scalar head shared by reward_model.py (producer) and ppo_tldr.py (consumer).
"""A transformer backbone with a scalar head: the reward model and PPO's value model.

    model = ScalarModel.from_pretrained("path/or/hub-id", revision=None)  # any of FORMATS (README.md "value_head.py")
    reward_logits, scores, sequence_lengths = get_reward(model, query_responses, pad_token_id, context_length)

Saved as a plain folder: the backbone with its own `save_pretrained` (config.json + weights, loadable by AutoModel),
plus `value_head.safetensors` (the head) and `value_head.json` (hidden size and the normalisation bias [D15]).
"""

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel
from transformers.utils import cached_file

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
FORMATS = [f"value_head folder ({HEAD_CONFIG} + {HEAD_WEIGHTS} + backbone)",
           'N+ reference ScalarModel (config.json architectures ["ScalarModel"], lm_backbone.* + scalar_head.*)',
           "*ForSequenceClassification with num_labels 1 (its score layer is the head)"]


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
        """A fresh head on a pretrained backbone (e.g. the SFT policy, whose LM head is dropped) [D10, D11]; fp32."""
        return cls(AutoModel.from_pretrained(path, dtype=torch.float32, **kwargs))

    @classmethod
    def from_pretrained(cls, path, revision=None, edit_config=None):
        """Load a folder or hub id (at `revision`; None: main) in one of FORMATS, told apart by its files; weights of
        any dtype load into fp32. `edit_config(config)` may change the backbone's config before it is built.
        `has_stored_bias` records whether the files hold the normalisation bias [D15] (else it is 0): always in this
        format; in the reference's, its config.json `bias`; in a sequence classifier, a `bias` in its config.json."""
        find = lambda name: cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                                        _raise_exceptions_for_connection_errors=False)
        config_file = find("config.json")
        raw = json.load(open(config_file)) if config_file else {}
        architectures = raw.get("architectures") or []
        if find(HEAD_CONFIG):  # this project's folder: backbone keys unprefixed, the head in its own file
            fmt, bias, stored = FORMATS[0], json.load(open(find(HEAD_CONFIG)))["bias"], True
            config, rename = AutoConfig.from_pretrained(path, revision=revision), {"": "backbone."}
        elif "ScalarModel" in architectures:  # the N+ reference's: config of its own, backbone config nested in it
            base = {k: v for k, v in raw["base_config"].items() if k != "_name_or_path"}  # a stale local path: unused
            fmt, bias, stored = FORMATS[1], raw.get("bias", 0.0), "bias" in raw
            config = AutoConfig.for_model(base.pop("model_type"), **base)
            rename = {"lm_backbone.": "backbone.", "scalar_head.": "scalar_head."}
        elif any(a.endswith("ForSequenceClassification") for a in architectures):
            fmt, bias, stored = FORMATS[2], raw.get("bias", 0.0), "bias" in raw
            config = AutoConfig.from_pretrained(path, revision=revision)
            if config.num_labels != 1:
                raise ValueError(f"{path}: config.json has num_labels={config.num_labels}; a reward model has 1")
            rename = {"score.": "scalar_head."}  # + the backbone's own prefix, below
        else:
            held = sorted(os.listdir(path)) if os.path.isdir(path) else [n for n in ["config.json", *WEIGHT_FILES] if find(n)]
            raise ValueError(f"{path} is in none of the formats tried ({'; '.join(FORMATS)}): config.json architectures "
                             f"{architectures}; it holds {held}")
        model = cls(AutoModel.from_config(edit_config(config) if edit_config else config, dtype=torch.float32), bias)
        model.has_stored_bias = stored
        if fmt == FORMATS[2]:
            rename[model.backbone.base_model_prefix + "."] = "backbone."  # e.g. gpt_neox.
        first = next((name for name in WEIGHT_FILES if find(name)), None)  # an index lists the shards
        if first is None:
            raise ValueError(f"{path} ({fmt}): no weights, none of {WEIGHT_FILES}")
        files = sorted(set(json.load(open(find(first)))["weight_map"].values())) if first.endswith("json") else [first]
        state = {}
        for name in files:
            if not find(name):
                raise ValueError(f"{path}: the weight shard {name} is missing")
            weights = (load_file(find(name)) if name.endswith(".safetensors")
                       else torch.load(find(name), map_location="cpu", weights_only=True))  # no pickle
            for key, value in weights.items():  # the files' names -> this module's (an unknown prefix stays)
                prefix = next((p for p in rename if key.startswith(p)), None)
                state[key if prefix is None else rename[prefix] + key[len(prefix):]] = value
        if fmt == FORMATS[0]:
            files.append(HEAD_WEIGHTS)
            head = load_file(find(HEAD_WEIGHTS)) if find(HEAD_WEIGHTS) else {}
            state.update({f"scalar_head.{k}": v for k, v in head.items()})
        expected, names = model.state_dict(), {new: old for old, new in rename.items()}
        as_file = lambda k: next((names[p] + k[len(p):] for p in names if k.startswith(p)), k)  # named as in the files
        optional = {"scalar_head.bias"} if fmt == FORMATS[2] else set()  # a classifier's score may have no bias (0)
        wrong = {"missing": [as_file(k) for k in expected if k not in state and k not in optional],
                 "unexpected": [as_file(k) for k in state if k not in expected],
                 "wrong shape": [f"{as_file(k)} {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
                                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]}
        if any(wrong.values()):
            raise ValueError(f"{path} ({fmt}; weights {files}): the weights do not match its config: " + "; ".join(
                f"{what} ({len(keys)}): {', '.join(keys[:4])}{' ...' * (len(keys) > 4)}" for what, keys in wrong.items()
                if keys))
        model.load_state_dict(state, strict=False)  # copies into the fp32 parameters
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
