"""The documentation, checked without running anything: README.md stays short, every relative
link in README.md, CONTRIBUTING.md and docs/*.md reaches a file (and heading) of this
repository, and every `launch/*.py` / `bench/*.py` command in their ```bash blocks names a
script that exists, with flags its argparse parser defines and `key=value` overrides that are
keys of `moe_dist.config.RunConfig`.

The scripts build their parsers inside `main()` (nothing to import without running them), so
their flags are read from the source: every `*.add_argument("--flag", ...)` call."""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250


def doc_files() -> list[Path]:
    files = [README, *sorted((ROOT / "docs").glob("*.md"))]
    return files + [f for f in (ROOT / "CONTRIBUTING.md",) if f.exists()]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


FENCE = re.compile(r"^(```|~~~)")


def split_fences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the prose with fenced blocks blanked, [(info string, block body)])."""
    prose, blocks, inside, info, body = [], [], None, "", []
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if inside is None and m:
            inside, info, body = m.group(1), line.strip()[3:].strip(), []
            prose.append("")
        elif inside is not None and line.strip().startswith(inside):
            blocks.append((info, "\n".join(body)))
            inside = None
            prose.append("")
        elif inside is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def links(text: str) -> list[str]:
    prose, _ = split_fences(text)
    prose = INLINE_CODE.sub("", prose)
    return LINK.findall(prose) + REF_LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.MULTILINE):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def test_the_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it <= {README_MAX_LINES}, move detail into docs/"


def test_the_docs_exist_and_say_what_they_answer():
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 5
    for page in pages:
        head = page.read_text().split("\n\n", 3)[:3]
        assert any(p.startswith("This page answers:") for p in head), f"{_id(page)}: no 'This page answers:' line"


@pytest.mark.parametrize("doc", doc_files(), ids=_id)
def test_every_relative_link_reaches_a_file_in_the_repository(doc: Path):
    text = doc.read_text()
    assert "../shared" not in text, f"{_id(doc)} refers to ../shared, outside the repository"
    bad = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # a URL
            if not target.lower().startswith(("http://", "https://", "mailto:")):
                bad.append(f"{target}: not a web URL (file:// and the like leave the repository)")
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/") or path.startswith("~"):
            bad.append(f"{target}: an absolute path; link relative to {_id(doc)}")
            continue
        dest = (doc.parent / path).resolve() if path else doc
        try:
            dest.relative_to(ROOT)
        except ValueError:
            bad.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {_id(dest)}")
    assert bad == [], f"{_id(doc)}:\n" + "\n".join(bad)


def test_the_link_checker_sees_links_and_anchors():
    text = "See [a](docs/a.md#x-y), ![img](b.png) and `[not](c.md)`.\n```bash\n[no](d.md)\n```\n[ref]: e.md\n"
    assert links(text) == ["docs/a.md#x-y", "b.png", "e.md"]
    assert slug("End to end: the whole run against HF + PEFT + DeepSpeed") == \
        "end-to-end-the-whole-run-against-hf--peft--deepspeed"
    assert slug("Expert placement (the `repartitioner`)") == "expert-placement-the-repartitioner"


# ---------------------------------------------------------------- commands in ```bash blocks

SCRIPT = re.compile(r"^(?:\./)?((?:launch|bench)/[\w./-]+\.(?:py|sh))$")
RUNNERS = re.compile(r"(^|/)(python[\d.]*|deepspeed|torchrun|mpirun|bash|sh)$")
SEPARATORS = {"&&", "||", ";", "|"}


@dataclasses.dataclass
class Parser:
    flags: dict[str, int | None]  # flag -> values it takes (None: any number)
    overrides: bool  # leftover `key=value` arguments are RunConfig overrides
    custom: bool  # reads sys.argv itself: only its existence is checked


@lru_cache(maxsize=None)
def parser_of(script: str) -> Parser:
    src = (ROOT / script).read_text()
    flags: dict[str, int | None] = {"-h": 0, "--help": 0}
    for node in ast.walk(ast.parse(src)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kw = {k.arg: k.value for k in node.keywords}
        action = ast.unparse(kw["action"]) if "action" in kw else ""
        nargs = kw["nargs"].value if isinstance(kw.get("nargs"), ast.Constant) else None
        takes: int | None = 1
        if action.strip("'\"") in ("store_true", "store_false", "count", "help", "version") \
                or action.endswith("BooleanOptionalAction"):
            takes = 0
        elif isinstance(nargs, int):
            takes = nargs
        elif nargs in ("?", "*", "+"):
            takes = None
        for name in names:
            if name.startswith("-"):
                flags[name] = takes
                if action.endswith("BooleanOptionalAction") and name.startswith("--"):
                    flags["--no-" + name[2:]] = 0
    overrides = re.search(r"\w+\s*,\s*(?!_\s*=)\w+\s*=\s*\w+\.parse_known_args", src) is not None
    return Parser(flags, overrides, "sys.argv" in src)


def run_config_key(key: str) -> bool:
    """`train.lr` is a leaf of moe_dist.config.RunConfig (a method's own section included)."""
    from moe_dist.config import RunConfig

    obj = RunConfig()
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
        if i < len(parts) - 1 and not dataclasses.is_dataclass(obj):
            return False
    return not dataclasses.is_dataclass(obj)


def placeholder(token: str) -> bool:
    """`...`, `$VAR`, `<x>`, `[key=value ...]`, `R.yaml`, `BASE`, `N`: stand for the reader's own."""
    return ("..." in token or "$" in token or token.startswith(("<", "[")) or token.endswith("]")
            or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\w+)?", token) is not None)


def commands(text: str) -> list[list[str]]:
    """Each shell command of the ```bash blocks, as tokens (continuations joined, comments cut)."""
    out = []
    for info, body in split_fences(text)[1]:
        if info.split()[:1] not in (["bash"], ["sh"], ["shell"], ["console"]):
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # an unbalanced quote: not a command line
                continue
            cmd: list[str] = []
            for tok in tokens + [";"]:
                if tok in SEPARATORS:
                    if cmd:
                        out.append(cmd)
                    cmd = []
                else:
                    cmd.append(tok)
    return out


def check_command(tokens: list[str]) -> list[str]:
    """Problems with one command's script and arguments ([] if it is fine or not ours)."""
    at = next((i for i, t in enumerate(tokens) if SCRIPT.match(t)), None)
    if at is None or not any(RUNNERS.search(t) for t in tokens[:at]):
        return []
    script = SCRIPT.match(tokens[at]).group(1)
    if not (ROOT / script).is_file():
        return [f"{script}: no such script"]
    if not script.endswith(".py"):
        return []
    parser = parser_of(script)
    if parser.custom:
        return []
    problems, args, i = [], tokens[at + 1:], 0
    while i < len(args):
        tok = args[i]
        i += 1
        if placeholder(tok):
            continue
        if tok.startswith("-") and tok != "-":
            flag, eq, value = tok.partition("=")
            if flag not in parser.flags:
                problems.append(f"{script}: unknown flag {flag}")
                if not eq and i < len(args) and not args[i].startswith("-") and "=" not in args[i]:
                    i += 1  # its value, most likely
                continue
            takes = parser.flags[flag]
            values = [value] if eq else []
            if not eq:
                want = takes if takes is not None else len(args)
                while len(values) < want and i < len(args) and not (args[i].startswith("-") and len(args[i]) > 1):
                    values.append(args[i])
                    i += 1
                if takes and len(values) < takes:
                    problems.append(f"{script}: {flag} takes {takes} value(s)")
            if flag == "--recipe" and values and values[0].startswith("launch/recipes/") \
                    and not (ROOT / values[0]).is_file():
                problems.append(f"{script}: no such recipe {values[0]}")
        elif "=" in tok and re.match(r"^[\w.]+=", tok):
            key = tok.split("=", 1)[0]
            if not parser.overrides:
                problems.append(f"{script}: takes no key=value overrides ({tok})")
            elif not run_config_key(key):
                problems.append(f"{script}: {key} is not a RunConfig key ({tok})")
        elif parser.overrides:
            problems.append(f"{script}: stray argument {tok!r} (overrides are key=value)")
    return problems


def test_the_command_checker_catches_what_it_should():
    bad = check_command(["deepspeed", "--num_gpus", "2", "launch/train.py", "--recipe", "launch/recipes/nope.yaml",
                         "--recipee", "x", "train.lrr=1", "train.lr=1e-4", "lora.expert_targets=a,b"])
    assert bad == ["launch/train.py: no such recipe launch/recipes/nope.yaml",
                   "launch/train.py: unknown flag --recipee",
                   "launch/train.py: train.lrr is not a RunConfig key (train.lrr=1)"]
    assert check_command(["python", "launch/export.py", "--checkpoint", "c", "--format", "peft", "--out", "o",
                          "ep_size=2"]) == ["launch/export.py: takes no key=value overrides (ep_size=2)"]
    assert check_command(["python", "launch/nope.py"]) == ["launch/nope.py: no such script"]
    assert check_command(["python", "bench/methods.py", "--no-second-base", "--seeds", "0,1", "hellora.top_k=2"]) == []
    assert check_command(["torchrun", "--rdzv-endpoint", "$HEAD:29400", "launch/train.py", "--recipe", "R.yaml",
                          "output_dir=/x", "..."]) == []
    assert check_command(["cat", "launch/nope.py"]) == []  # not run
    assert commands("```bash\npython launch/a.py --x 1 \\\n  k=v  # note\nfoo && python b.py\n```\n") == [
        ["python", "launch/a.py", "--x", "1", "k=v"], ["foo"], ["python", "b.py"]]


@pytest.mark.parametrize("doc", doc_files(), ids=_id)
def test_every_documented_command_is_accepted_by_its_script(doc: Path):
    problems = [f"{' '.join(cmd)}\n    -> {p}" for cmd in commands(doc.read_text()) for p in check_command(cmd)]
    assert problems == [], f"{_id(doc)}:\n" + "\n".join(problems)


def test_the_two_commands_are_in_the_readme():
    """CI (.ci/run) and newcomers run these two lines as written."""
    text = README.read_text()
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]"'
    assert f"{setup} && deepspeed --num_gpus 2 launch/train.py --recipe launch/recipes/tiny_lora.yaml\n" in text
    assert f"{setup} && python -m pytest -q tests\n" in text
