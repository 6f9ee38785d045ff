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
    """name -> {script: source} for every top-level function and class (other than Args and main) of the four scripts."""
    found = defaultdict(dict)
    for script in SCRIPTS:
        for node in parse(script).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in ("Args", "main"):
                found[node.name][script] = ast.unparse(node)
    return found


@pytest.mark.parametrize("name, copies", [(n, c) for n, c in sorted(top_level_definitions().items()) if len(c) > 1])
def test_a_helper_copied_between_scripts_is_identical(name, copies):
    first_script, first = next(iter(copies.items()))
    for script, source in copies.items():
        assert source == first, f"{name} differs between {first_script} and {script}: one name, one meaning"


def plumbing_block(script):
    """The lines from the block's opening rule to its END OF PLUMBING line."""
    with open(os.path.join(ROOT, script)) as f:
        lines = f.read().split("\n")
    starts = [i - 1 for i, line in enumerate(lines) if line.startswith("# PLUMBING")]
    ends = [i for i, line in enumerate(lines) if "END OF PLUMBING" in line]
    assert len(starts) == len(ends) == 1, f"{script}: one plumbing block, opened by '# PLUMBING' and closed by END OF PLUMBING"
    return lines[starts[0] : ends[0] + 1]


def test_the_plumbing_block_is_identical_and_last():
    first = plumbing_block(SCRIPTS[0])
    for script in SCRIPTS:
        block = plumbing_block(script)
        assert block == first, f"the plumbing block of {script} differs from {SCRIPTS[0]}'s"
        tree = parse(script)
        assert ast.unparse(tree.body[-1]) == "if __name__ == '__main__':\n    main(tyro.cli(Args))", \
            f"{script}: the file ends with the plumbing block, then `main(tyro.cli(Args))` under __main__"
        with open(os.path.join(ROOT, script)) as f:
            text = f.read()
        assert "def main(args):" in text.split("# PLUMBING")[0], f"{script}: main(args) comes before the plumbing"


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


def runs_at_import(tree):
    """The top-level statements of a module that run code when it is imported. Allowed: imports; function and class
    definitions (their decorators, bases and default values are part of the definition); a docstring (an expression
    that is a constant); an assignment to plain names that calls nothing (its value made of literals, names,
    attributes, operators, f-strings); `if __name__ == "__main__":` without an else. Anything else is returned."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            runs = [n for n in ast.walk(node) if isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr))]
            if all(isinstance(t, ast.Name) for t in targets) and not runs:
                continue
        if isinstance(node, ast.If) and not node.orelse and ast.unparse(node.test) in (
                "__name__ == '__main__'", "'__main__' == __name__"):
            continue
        found.append(ast.unparse(node).split("\n")[0])
    return found


@pytest.mark.parametrize("script", [*SCRIPTS, "value_head.py"])
def test_importing_a_script_runs_nothing(script):
    assert runs_at_import(parse(script)) == [], f"{script} runs code at import"


@pytest.mark.parametrize("source", [
    "args = tyro.cli(Args)",
    "tyro.cli(Args)",
    "import tyro\nfrom dataclasses import dataclass\n@dataclass\nclass Args:\n    seed: int = 1\ntyro.cli(Args)",
    "DEVICE = torch.device('cuda')",
    "COLUMNS = sorted(['b', 'a'])",
    "for i in range(2):\n    pass",
    "with open('x') as f:\n    pass",
    "if DEBUG:\n    main()",
    "if __name__ == '__main__':\n    main()\nelse:\n    main()",
    "os.environ['X'] = '1'",
    "X: int = len('ab')",
    "torch.manual_seed(0)",
])
def test_the_import_check_rejects_a_statement_that_runs_code(source):
    assert runs_at_import(ast.parse(source)) != []


def test_the_import_check_accepts_definitions():
    source = ('"""doc"""\nimport os\nfrom a import b\nN = 1.0\nNAMES = {"a", "b"}\nFILE = f"{N}.json"\nM = -N * 2\n'
              "@dataclass\nclass Args:\n    seed: int = 1\ndef main():\n    tyro.cli(Args)\n"
              "if __name__ == '__main__':\n    main()")
    assert runs_at_import(ast.parse(source)) == []
