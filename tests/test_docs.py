"""Docs that cannot drift: README.md and docs/**/*.md against the code.

(a) Every `longctx` command in a fenced shell block (```bash, ```sh, ```shell, ```console or a fence without a
    language) parses with the real parser, `launch.cli.build_parser`, the way `main()` parses: known arguments
    first, then key=value words that follow options join the overrides. A command is a line (backslash
    continuations joined, `# comments` dropped, a leading `$ ` prompt taken off) or one part of it between `&&`,
    `||`, `;`, `|` and `&`, whose first word is `longctx`, after any `NAME=value` environment words and a `time`,
    `/usr/bin/time` or `/usr/bin/time -v` in front. When the config it names exists, it is loaded with the line's
    overrides (`load_config`), so a renamed key fails here, not for a user.
(b) A command that names a config that exists is also run, through `python -m longctx`'s entry point: `run` with
    `--plan`, `launch` with `--dry-run` (in place of `--submit`); it must exit 0. Neither starts any training.
    Other commands have no such mode and are only parsed and loaded.
    Placeholders: example paths that do not exist here (CKPT, /models/..., prepare.yaml, hostfile, a run's
    checkpoints/) make a command parse-only. The rule: a command runs only when every file it reads exists: its
    config, the `--hostfile` it names, and for `launch` the config's `model.from_pretrained` (the scripts are
    rendered from the checkpoint's own config.json); where that checkpoint is absent the dry run is skipped,
    naming it.
(c) Every relative link (and image) in README.md and docs/**/*.md resolves to a file or folder inside the
    repository, without a #anchor (a renamed heading cannot break it); no link points outside the repository.
The README's test command is the one `.ci/run` runs, and its command map names every subcommand of the CLI.
"""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
OPERATORS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _shell_lines(page: Path):
    """(line number, text) of every line inside a shell fence, backslash continuations joined."""
    out, fence, pending = [], None, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and fence is None:
            fence = (m.group(2)[0], m.group(3).lower())
            continue
        if m and fence and m.group(2)[0] == fence[0] and not m.group(3):
            fence, pending = None, None
            continue
        if fence is None or fence[1] not in SHELL_FENCES:
            continue
        text = line.strip()
        if pending:
            text = pending[1] + " " + text
            number = pending[0]
        if text.endswith("\\"):
            pending = (number, text[:-1])
            continue
        pending = None
        out.append((number, text.removeprefix("$ ")))
    return out


def _commands(text: str):
    """The argument lists of the `longctx` commands in one shell line (without the leading `longctx`)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:          # an unbalanced quote: not a command line
        return []
    parts, part = [], []
    for w in words:
        if w in OPERATORS:
            parts.append(part)
            part = []
        else:
            part.append(w)
    parts.append(part)
    found = []
    for part in parts:
        while part and re.match(r"^[A-Za-z_]\w*=", part[0]):
            part = part[1:]
        if part[:1] == ["time"]:
            part = part[1:]
        elif part[:1] == ["/usr/bin/time"]:
            part = part[2:] if part[1:2] == ["-v"] else part[1:]
        if part[:1] == ["longctx"]:
            found.append(part[1:])
    return found


def _documented_commands():
    out = []
    for page in PAGES:
        for number, text in _shell_lines(page):
            out += [(f"{_name(page)}:{number}", argv) for argv in _commands(text)]
    return out


COMMANDS = _documented_commands()


def _parse(argv):
    """As launch.cli.main() parses: known arguments, then key=value words after options join the overrides."""
    from longctx.launch.cli import build_parser
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def _parsed(where, argv, capsys):
    try:
        return _parse(argv)
    except SystemExit:
        pytest.fail(f"{where}: `longctx {shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def _config(args):
    """(config path, overrides) the command loads, or None."""
    if args.command == "bench":
        return (args.bench_config, args.overrides) if args.overrides else None
    return (args.config, args.overrides) if getattr(args, "config", None) else None


def test_the_docs_show_longctx_commands():
    commands = {argv[0] for _, argv in COMMANDS if argv}
    assert {"prepare", "run", "launch", "eval", "calibrate", "export", "bench", "study"} <= commands, commands
    assert any(where.startswith("README.md:") for where, _ in COMMANDS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses_and_loads_its_config(where, argv, capsys):
    args = _parsed(where, argv, capsys)
    if args.command == "bench" and args.overrides:
        assert args.what == "train" and args.plateau, f"{where}: config overrides apply to `bench train --plateau` only"
    config = _config(args)
    if config and (ROOT / config[0]).is_file():
        from longctx.pipeline.config import ConfigError, load_config
        try:
            load_config(str(ROOT / config[0]), list(config[1]))
        except ConfigError as e:
            pytest.fail(f"{where}: `longctx {shlex.join(argv)}`: config error: {e}")


def _runnable():
    """(where, argv to run) for each distinct `run` / `launch` / `study` command whose config (study file) and
    hostfile exist: `run --plan`, `launch --dry-run`, `study --dry-run`."""
    out, seen = [], set()
    for where, argv in COMMANDS:
        try:
            args = _parse(argv)
        except SystemExit:
            continue                                     # reported by the parse test
        if args.command == "study":
            if (ROOT / args.study).is_file() and ("study", args.study) not in seen:
                seen.add(("study", args.study))
                out.append((where, ["study", args.study, "--dry-run"]))
            continue
        if args.command not in ("run", "launch") or not (ROOT / args.config).is_file():
            continue
        if getattr(args, "hostfile", None) and not (ROOT / args.hostfile).exists():
            continue
        if args.command == "run":
            run = argv if args.plan else [*argv, "--plan"]
        else:
            run = [a for a in argv if a not in ("--submit", "--dry-run")] + ["--dry-run"]
        if tuple(run) not in seen:
            seen.add(tuple(run))
            out.append((where, run))
    return out


RUNNABLE = _runnable()


def test_some_documented_commands_are_run():
    assert {argv[0] for _, argv in RUNNABLE} == {"run", "launch", "study"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where,argv", RUNNABLE, ids=[where for where, _ in RUNNABLE])
def test_documented_command_runs_with_plan_or_dry_run(where, argv, capsys):
    """In this process, through the entry point `python -m longctx` calls (tests/shared.py::longctx_here), from
    the repository's root as the docs' paths are: none of these modes starts a process, so a subprocess per line
    would add only its ~4 s of imports. The console script itself is tested in tests/test_cli.py."""
    from tests.shared import longctx_here
    r = longctx_here(capsys, *argv, cwd=ROOT)
    assert r.returncode == 0, (f"{where}: `longctx {shlex.join(argv)}` exited {r.returncode}:\n"
                               f"{r.stdout[-2000:]}{r.stderr[-3000:]}")
    assert r.stdout.strip(), f"{where}: `longctx {shlex.join(argv)}` printed nothing"


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code, where brackets are code, not links."""
    lines, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and fence is None:
            fence = m.group(2)[0]
        elif m and fence == m.group(2)[0] and not m.group(3):
            fence = None
        elif fence is None:
            lines.append(line)
    return re.sub(r"(`+).*?\1", "", "\n".join(lines), flags=re.S)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("page", PAGES, ids=[_name(p) for p in PAGES])
def test_every_link_resolves_inside_the_repository(page):
    bad = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            bad.append(f"{target}: points outside the repository")
        elif "#" in target:
            bad.append(f"{target}: an anchor (link the page; name the section in words)")
        else:
            path = (ROOT / target.lstrip("/")) if target.startswith("/") else (page.parent / target)
            path = path.resolve()
            if ROOT not in (path, *path.parents):
                bad.append(f"{target}: outside the repository")
            elif not path.exists():
                bad.append(f"{target}: no such file")
    assert not bad, f"{_name(page)}: " + "; ".join(bad)


@pytest.mark.timeout(60)
def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    at = next(i for i, line in enumerate(ci) if line.startswith("#") and 'README "Set up"' in line)
    command = ci[at + 1].strip()
    assert command.endswith("python -m pytest"), command
    assert command in {text for _, text in _shell_lines(ROOT / "README.md")}, (
        f"README's set-up block no longer has .ci/run's test command: {command}")


@pytest.mark.timeout(60)
def test_readme_maps_every_command():
    from longctx.launch.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in sub.choices if f"`longctx {name}" not in readme]
    assert not missing, f"README's command map misses longctx {', '.join(missing)}"
