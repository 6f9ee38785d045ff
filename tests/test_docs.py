"""README.md's N+ detail index against the project: every detail tag used in the code, the READMEs and the tests is
a row of the index, every row is used, and every function and test a row names exists. Fast: text and `ast` only.

Tag syntax: the paper's `[D23]`, `[D23.1]`, a range `[D10-D15]` (it cites its two ends); this project's own
`[PPO.name]` (also `SFT.`, `RM.`, `DPO.`); a comma list of these, `[D4, D5]`, `[D23.2, PPO.eos_mask]`. Anything else in
brackets that starts with `D` and a digit or with `PPO.` (`SFT.`, ...) is a malformed tag. An index row reads: | [tag] | what it is | `script.py:function`, ... | `tests/test_x.py::test_y`, ... |
where `script.py:main` is the script's main code (a `main` function or its `if __name__ == "__main__":` block)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
INDEX_HEADING = "## N+ detail index"
MAX_README_LINES = 350

PAPER_TAG = re.compile(r"D\d+(?:\.\d+)?")
PROJECT_TAG = re.compile(r"(?:SFT|RM|PPO|DPO)\.[a-z][a-z0-9_]*")
CANDIDATE = re.compile(r"\[((?:D\d|(?:SFT|RM|PPO|DPO)\.)[^\]\n]*)\]")  # what looks like a citation; checked below
FUNCTION_CELL = re.compile(r"`([\w./-]+\.py):(\w+)`")
TEST_CELL = re.compile(r"`(tests/[\w./-]+\.py)::(\w+)`")


def find_tags(text):
    """(tags, malformed): the tags `text` cites, each member of a list (`[D4, D5]`, `[D23.2, PPO.eos_mask]`) and
    each end of a range (`[D10-D15]`) on its own, and the bracketed texts that start like a tag but are not one."""
    tags, malformed = [], []
    for match in CANDIDATE.finditer(text):
        found = []
        for part in match.group(1).split(","):
            part = part.strip()
            ends = [e.strip() for e in part.split("-")] if part.startswith("D") else [part]
            if len(ends) <= 2 and all(PAPER_TAG.fullmatch(e) for e in ends) or PROJECT_TAG.fullmatch(part):
                found += [f"[{e}]" for e in ends]
            else:
                found = None
                break
        if found is None:
            malformed.append(match.group(0))
        else:
            tags += found
    return tags, malformed


def split_readme(text):
    """(the README without its index section, the index section's lines)."""
    lines = text.splitlines()
    if INDEX_HEADING not in lines:
        raise AssertionError(f"README.md has no line {INDEX_HEADING!r}")
    start = lines.index(INDEX_HEADING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[:start] + lines[end:]), lines[start:end]


def parse_index(index_lines):
    """(rows, errors): rows {tag: (functions, tests, line)} of the index table, each function (file, name), each test
    (file, name); errors name each malformed or repeated row."""
    rows, errors = {}, []
    for line in index_lines:
        if not line.startswith("| ["):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4:
            errors.append(f"index row has {len(cells)} cells, not 4 (tag | what | implemented in | checked by): {line}")
            continue
        tag, _, functions, tests = cells
        tags, malformed = find_tags(tag)
        if malformed or len(tags) != 1 or tags[0] != tag:
            errors.append(f"index row {tag}: the first cell must be exactly one tag of the tag syntax, got {tag!r}")
            continue
        if tag in rows:
            errors.append(f"index row {tag} appears twice")
        function_names, test_names = FUNCTION_CELL.findall(functions), TEST_CELL.findall(tests)
        if not function_names:
            errors.append(f"index row {tag}: 'implemented in' names no `script.py:function`: {functions!r}")
        if not test_names:
            errors.append(f"index row {tag}: 'checked by' names no `tests/test_x.py::test_name`: {tests!r}")
        rows[tag] = (function_names, test_names, line)
    return rows, errors


def project_texts():
    """{relative path: text} of the files whose tags the index must cover: the top-level scripts and READMEs,
    benchmark/ (code, READMEs, recipes; not its results/) and tests/ (this file aside)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.md")]
    files += [p for p in (ROOT / "benchmark").rglob("*") if p.suffix in (".py", ".md", ".sh")
              and "results" not in p.relative_to(ROOT / "benchmark").parts]
    files += [p for p in (ROOT / "tests").rglob("*.py") if p.resolve() != Path(__file__).resolve()]
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(files) if "__pycache__" not in p.parts}


def tag_uses(texts, readme_name="README.md"):
    """(uses, malformed): {tag: [files citing it]} and ["file: text"] of malformed tags; the README's index section
    does not count as a use."""
    uses, malformed = {}, []
    for name, text in texts.items():
        if name == readme_name:
            text, _ = split_readme(text)
        tags, bad = find_tags(text)
        for tag in tags:
            uses.setdefault(tag, [])
            if name not in uses[tag]:
                uses[tag].append(name)
        malformed += [f"{name}: {b}" for b in bad]
    return uses, malformed


def top_level_names(path):
    """Names a row may cite in `path`: its top-level functions and classes, and `main` when it has a main block."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    if any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) and "__main__" in ast.unparse(n.test)
           for n in tree.body):
        names.add("main")
    return names


def missing_names(rows, root=ROOT):
    """One error per function or test a row names that does not exist."""
    errors, cache = [], {}
    for tag, (functions, tests, _) in rows.items():
        for column, entries, sep in [("implemented in", functions, ":"), ("checked by", tests, "::")]:
            for file, name in entries:
                path = root / file
                if not path.is_file():
                    errors.append(f"index row {tag}, '{column}': no file {file} (in `{file}{sep}{name}`)")
                    continue
                if path not in cache:
                    cache[path] = top_level_names(path)
                if name not in cache[path]:
                    errors.append(f"index row {tag}, '{column}': {file} has no top-level {name!r} "
                                  f"(in `{file}{sep}{name}`)")
    return errors


def coverage_errors(rows, uses):
    """Tags used but not in the index, and rows that nothing outside the index uses."""
    errors = [f"{tag} is used in {', '.join(files)} but is not a row of README.md's index ({INDEX_HEADING!r})"
              for tag, files in sorted(uses.items()) if tag not in rows]
    errors += [f"index row {tag} is used nowhere outside the index (code, README.md, benchmark/, tests): "
               f"remove the row or cite the tag" for tag in sorted(rows) if tag not in uses]
    return errors


# ---------------------------------------------------------------- the project's README --------------------------
def readme_index():
    _, index_lines = split_readme(README.read_text())
    return parse_index(index_lines)


def test_the_index_rows_are_well_formed():
    _, errors = readme_index()
    assert not errors, "\n".join(errors)


def test_every_tag_used_is_a_row_and_every_row_is_used():
    rows, _ = readme_index()
    uses, malformed = tag_uses(project_texts())
    errors = [f"malformed tag {m}" for m in malformed] + coverage_errors(rows, uses)
    assert not errors, "\n".join(errors)


def test_every_function_and_test_a_row_names_exists():
    rows, _ = readme_index()
    errors = missing_names(rows)
    assert not errors, "\n".join(errors)


def test_the_readme_has_at_most_350_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, more than {MAX_README_LINES}"


# ---------------------------------------------------------------- the checks themselves, on made-up input -------
def test_find_tags_splits_lists_and_ranges_and_flags_malformed_ones():
    text = ("a [D2.2] b [D4, D5] c [D10-D15] d [PPO.gae] e [D23.2, PPO.eos_mask] [PAD] [AB] x[0] "
            "[D23,1] [D7 x] [PPO.Gae] [D1-D2-D3] [PPO.gae-D2]")
    tags, malformed = find_tags(text)
    assert tags == ["[D2.2]", "[D4]", "[D5]", "[D10]", "[D15]", "[PPO.gae]", "[D23.2]", "[PPO.eos_mask]"]
    assert malformed == ["[D23,1]", "[D7 x]", "[PPO.Gae]", "[D1-D2-D3]", "[PPO.gae-D2]"]


def test_the_checks_name_the_wrong_row_or_name(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "algo.py").write_text("def gae():\n    pass\n\nif __name__ == '__main__':\n    gae()\n")
    (tmp_path / "tests" / "test_algo.py").write_text("def test_gae():\n    pass\n")
    index = [INDEX_HEADING, "| tag | what | implemented in | checked by |", "|---|---|---|---|",
             "| [PPO.gae] | GAE | `algo.py:gae`, `algo.py:main` | `tests/test_algo.py::test_gae` |",
             "| [D3] | response | `algo.py:tokenize` | `tests/test_algo.py::test_tokenize` |",
             "| [D7] | dropout | `nope.py:f` | none |",
             "| [D7] | again | `algo.py:gae` | `tests/test_algo.py::test_gae` |",
             "| [D9] | too few cells | `algo.py:gae` |"]
    rows, errors = parse_index(index)
    assert sorted(rows) == ["[D3]", "[D7]", "[PPO.gae]"]
    assert any("[D7]: 'checked by' names no" in e for e in errors)
    assert any("[D7] appears twice" in e for e in errors)
    assert any("has 3 cells" in e and "[D9]" in e for e in errors)
    rows["[D7]"] = ([("nope.py", "f")], [("tests/test_algo.py", "test_gae")], "")
    missing = missing_names(rows, root=tmp_path)
    assert missing == ["index row [D3], 'implemented in': algo.py has no top-level 'tokenize' (in `algo.py:tokenize`)",
                       "index row [D3], 'checked by': tests/test_algo.py has no top-level 'test_tokenize' "
                       "(in `tests/test_algo.py::test_tokenize`)",
                       "index row [D7], 'implemented in': no file nope.py (in `nope.py:f`)"]
    uses, _ = tag_uses({"algo.py": "# [PPO.gae] [D99]", "README.md": "intro [D3]\n" + "\n".join(index)})
    assert coverage_errors(rows, uses) == [
        f"[D99] is used in algo.py but is not a row of README.md's index ({INDEX_HEADING!r})",
        "index row [D7] is used nowhere outside the index (code, README.md, benchmark/, tests): remove the row or "
        "cite the tag"]


SECTION_REFERENCE = re.compile(r'((?:benchmark/)?README)(?:\.md)? "([^"]+)"')


def section_reference_errors(texts, root=ROOT):
    """Every `README.md "Section"` / `benchmark/README.md "Section"` written in `texts` ({path: text}) must name a
    heading of that file (a quote may wrap over a line break)."""
    headings = {}
    for name in ("README", "benchmark/README"):
        lines = (root / f"{name}.md").read_text().splitlines()
        headings[name] = {line.lstrip("#").strip() for line in lines if line.startswith("#")}
    errors = []
    for path, text in texts.items():
        for readme, section in SECTION_REFERENCE.findall(text):
            if " ".join(section.split()) not in headings[readme]:
                errors.append(f"{path} points to {readme}.md \"{section}\", which has no such section")
    return errors


def test_every_readme_section_named_in_the_project_exists():
    texts = project_texts()
    texts["tests/test_docs.py"] = ""  # this file's examples aside
    errors = section_reference_errors(texts)
    assert not errors, "\n".join(errors)


def test_a_reference_to_a_missing_section_is_reported():
    errors = section_reference_errors({"a.py": '# see README.md "Set-up", benchmark/README.md "No such part"'})
    assert errors == ['a.py points to benchmark/README.md "No such part", which has no such section']
