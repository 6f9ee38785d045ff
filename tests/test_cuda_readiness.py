"""What only CUDA would show, checked on CPU: the device audit itself (NCCL refuses CPU tensors in collectives, gloo
takes them; each script's FSDP test runs under the audit, conftest.audited_run), generation keeps its numbers with
the last-position prefill, the fast attention path."""

import json
import warnings

import pytest
import torch

from conftest import audited_env, run_ok


# ------------------------------------------------------------ the audit itself ---------------------------------
AUDIT_SELF_TEST = r"""
import torch, torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
device = torch.device("cpu")
stray = torch.zeros(3)                                    # no device: would be a CPU tensor on a CUDA machine
placed = torch.zeros(3, device=device)
dist.all_reduce(stray.mean())                             # 1: computed only from a stray tensor
dist.all_reduce(torch.stack([stray[0], stray[1]]))        # 2
dist.all_reduce(placed + stray)                           # fine: CUDA's rule for mixed inputs
dist.all_reduce(torch.tensor([1.0]).to(device))           # fine: moved
x = torch.ones(2)
x += placed[:2]                                           # in place: x stays where it was
dist.all_reduce(x)                                        # 3
dist.all_reduce(torch.ones(2, device=None))               # 4: device=None is no device
dist.broadcast(placed, src=0)                             # fine
dist.destroy_process_group()
"""


def test_the_audit_flags_tensors_created_without_a_device(tmp_path):
    script = tmp_path / "ppo_tldr.py"  # the audit watches processes started on one of the scripts' names
    script.write_text(AUDIT_SELF_TEST)
    run_ok(script, env={**audited_env(tmp_path / "audit"), "TLDR_DEVICE_AUDIT_ROOT": str(tmp_path)}, timeout=120)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "audit").glob("audit_*.json")]
    assert [v["collective"] for v in record["violations"]] == ["all_reduce"] * 4
    assert [v["where"].split(":")[1] for v in record["violations"]] == ["7", "8", "13", "14"]
    assert record["checked"] == {"all_reduce": 6, "broadcast": 1}


# ------------------------------------------------------------ generation ---------------------------------------
def generate_before(model, queries, pad_token_id, response_length, temperature):
    """The sampler as it was: full-width prefill logits, the KV cache passed as `past_key_values`, a forward after the
    last token."""
    import torch.nn.functional as F

    attention_mask = (queries != pad_token_id).long()
    position_ids = attention_mask.cumsum(1) - attention_mask
    input_ids = torch.masked_fill(queries, queries == pad_token_id, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
        tokens, all_logits = [], []
        for _ in range(response_length):
            logits = output.logits[:, -1, :].float() / (temperature + 1e-7)
            token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            tokens.append(token)
            all_logits.append(logits)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            output = model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=output.past_key_values, use_cache=True)
    return torch.cat([queries] + tokens, dim=1), torch.stack(all_logits, dim=1)


@pytest.mark.parametrize("temperature", [0.7, 0.01])
def test_generate_samples_the_same_tokens_and_logits_as_before(world, temperature):
    from ppo_tldr import config_without_dropout, generate, logprobs_of
    from transformers import AutoModelForCausalLM

    path = str(world / "base_model")
    model = AutoModelForCausalLM.from_pretrained(path, config=config_without_dropout(path)).eval()
    queries = torch.randint(1, 700, (5, 12), generator=torch.Generator().manual_seed(3))
    queries[1, :4] = queries[3, :7] = 10_000  # left padding
    with torch.no_grad():
        torch.manual_seed(7)
        old_tokens, old_logits = generate_before(model, queries, 10_000, 16, temperature)
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no FutureWarning/DeprecationWarning from the new calls
            new_tokens, new_logits = generate(model, queries, 10_000, 16, temperature)
    assert torch.equal(new_tokens, old_tokens)
    torch.testing.assert_close(new_logits, old_logits, rtol=1e-5, atol=1e-5)
    response = new_tokens[:, 12:]
    torch.testing.assert_close(logprobs_of(new_logits, response), logprobs_of(old_logits, response), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ the fast attention path --------------------------
def test_models_load_with_sdpa_attention(world, reward_model):
    """transformers 5.24 picks PyTorch's scaled_dot_product_attention for GPT-NeoX by default (flash / memory-efficient
    kernels on CUDA); the loaders keep that default."""
    from ppo_tldr import load_policy, load_tokenizer
    from value_head import ScalarModel

    tokenizer = load_tokenizer(str(world / "base_model"), "--sft-model-path")
    policy = load_policy(str(world / "base_model"), tokenizer, torch.device("cpu"))
    assert policy.config._attn_implementation == "sdpa"
    assert ScalarModel.from_pretrained(str(reward_model)).backbone.config._attn_implementation == "sdpa"
