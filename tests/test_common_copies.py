"""The four scripts copy their shared helpers on purpose (each file stands alone); the copies must stay identical,
and the common block of Args must be the same in all four, so that `diff sft.py dpo.py` shows only the algorithm."""

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sft.py", "reward_model.py", "ppo_tldr.py", "dpo.py"]
COMMON_FIELDS = ["exp_name", "seed", "track", "wandb_project_name", "wandb_entity", "output_dir", "run_eval", "bf16", "tf32"]


def parse(script):
    with open(os.path.join(ROOT, script)) as f:
        return ast.parse(f.read())


def top_level_definitions():
    """name -> {script: source} for every top-level function and class (other than Args) of the four scripts."""
    found = defaultdict(dict)
    for script in SCRIPTS:
        for node in parse(script).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "Args":
                found[node.name][script] = ast.unparse(node)
    return found


@pytest.mark.parametrize("name, copies", [(n, c) for n, c in sorted(top_level_definitions().items()) if len(c) > 1])
def test_a_helper_copied_between_scripts_is_identical(name, copies):
    first_script, first = next(iter(copies.items()))
    for script, source in copies.items():
        assert source == first, f"{name} differs between {first_script} and {script}: one name, one meaning"


def test_the_common_block_of_args_is_identical():
    blocks = {}
    for script in SCRIPTS:
        args = next(n for n in parse(script).body if isinstance(n, ast.ClassDef) and n.name == "Args")
        fields = [s for s in args.body if isinstance(s, ast.AnnAssign)]
        names = [f.target.id for f in fields[: len(COMMON_FIELDS)]]
        assert names == COMMON_FIELDS, f"{script}: the common block must open Args, in this order"
        body = args.body[: args.body.index(fields[len(COMMON_FIELDS) - 1]) + 2]  # fields with their docstrings
        blocks[script] = [ast.unparse(s) for s in body]
    first = blocks[SCRIPTS[0]]
    for script, block in blocks.items():
        assert block == first, f"the common block of {script} differs from {SCRIPTS[0]}'s"


def test_importing_a_script_runs_nothing():
    for script in SCRIPTS:
        for node in parse(script).body:
            assert not isinstance(node, (ast.For, ast.While, ast.With)), f"{script} runs code at import"
