"""Shared fixtures and runners: the tiny offline world, built once per test session; offline mode for every test;
running a script (or torchrun) as a subprocess; a free port; the tiny world's paths on a script's command line.

Cost tiers: a test that launches a script, torchrun or a process group, or trains, carries `@pytest.mark.slow`;
`python -m pytest tests -q -m "not slow"` runs the formula and invariant tests alone."""

import json
import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
# one thread per process: on a small shared CPU, torch's spinning worker threads slow a run down several times
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_script(*command, torchrun=False, env=None, timeout=600):
    """`python *command` (`torchrun`, 2 processes, with torchrun=True) from the repository root, one thread per process,
    output captured; env adds to the environment. command: a script path relative to the root and its arguments."""
    launcher = TORCHRUN if torchrun else [sys.executable]
    return subprocess.run([*launcher, *map(str, command)], cwd=ROOT, env={**os.environ, **ONE_THREAD, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def run_ok(*command, **kwargs):
    """run_script that must exit 0; a failure shows the ends of stdout and stderr."""
    result = run_script(*command, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def raises_in_process(script, *command, error=ValueError, match=None):
    """Run `python script *command` in this process (no start-up cost; for inputs that must fail before any model
    loads) and return the exception it raises, which must be `error` (matching the regular expression `match`)."""
    import runpy

    saved = sys.argv
    sys.argv = [script, *map(str, command)]
    try:
        with pytest.raises(error, match=match) as caught:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = saved
    return caught.value


def audited_env(audit_dir):
    """What a run's environment adds so that its processes record every collective's tensors in `audit_dir`
    (tests/device_audit/sitecustomize.py: NCCL refuses CPU tensors, gloo takes them, so the CPU suite must look)."""
    path = os.pathsep.join([os.path.join(ROOT, "tests", "device_audit")] +
                           [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {"PYTHONPATH": path, "TLDR_DEVICE_AUDIT": str(audit_dir)}


def audited_run(*command, audit_dir, **kwargs):
    """run_ok of a two-process torchrun command whose collectives are audited; returns (the two processes' audit
    records, the result), after checking that no CPU tensor entered a collective and that the audit saw some."""
    result = run_ok(*command, torchrun=True, env={**kwargs.pop("env", {}), **audited_env(audit_dir)}, **kwargs)
    records = [json.loads(p.read_text()) for p in sorted(audit_dir.glob("audit_*.json"))]
    assert len(records) == 2, f"expected the audits of 2 processes, found {len(records)} in {audit_dir}"
    violations = [v for r in records for v in r["violations"]]
    assert not violations, "CPU tensors (created without a device) entered collectives:\n" + "\n".join(
        f"  {v['collective']} at {v['where']} ({v['function']}), shape {v['shape']}" for v in violations)
    assert all(sum(r["checked"].values()) > 0 for r in records)  # the audit saw the collectives
    return records, result


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_args(world, script, reward_model=None):
    """The tiny world's model and datasets (and the reward model, for ppo_tldr.py), under the names `script` gives
    them."""
    args = ["--base-model" if script == "sft.py" else "--sft-model-path", str(world / "base_model"),
            "--query-dataset", str(world / "tldr_sft")]
    if script in ("reward_model.py", "dpo.py"):
        args += ["--label-dataset", str(world / "tldr_preference")]
    if reward_model is not None:
        args += ["--reward-model-path", str(reward_model)]
    return args


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
