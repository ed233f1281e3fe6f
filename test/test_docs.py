"""The README and docs/ name commands, options, ROS names and links that really exist.

Fast on purpose: no model is loaded and no ROS node is started. Commands are checked against the
code itself (the CLI's argparse parser, the node's parameter list, the .srv/.action files, the
names the node's source gives its services, topics and action, the launch file's arguments);
commands that cannot be checked this way are listed in ``UNCHECKED`` with what runs them.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from personal_vlm_node.cli import build_parser
from personal_vlm_node.ros.process import NODE_NAME
from personal_vlm_node.settings import PARAMETERS

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
INTERFACES = REPO / "interfaces" / "personal_vlm_interfaces"
ROS_SOURCES = sorted((REPO / "personal_vlm_node" / "ros").glob("*.py"))
LAUNCH_DIR = REPO / "launch"
README_MAX_LINES = 250
QUICK_START = ["./quickstart.sh node", "./quickstart.sh test"]
SHELL_LANGUAGES = ("bash", "sh", "shell")
LIFECYCLE_TRANSITIONS = ("configure", "cleanup", "activate", "deactivate", "shutdown")

# Programs whose documented use these checks cannot verify, and what runs them for real.
UNCHECKED = {
    "source": "scripts/check_colcon_venv.sh (ROS setup and venv activation)",
    "mkdir": "scripts/check_colcon_venv.sh (makes the workspace)",
    "cd": "scripts/check_colcon_venv.sh",
    "git": "scripts/check_colcon_venv.sh (clones into the workspace)",
    "rosdep": "scripts/check_colcon_venv.sh",
    "touch": "scripts/check_colcon_venv.sh (COLCON_IGNORE in the venv)",
    "pip": "scripts/check_colcon_venv.sh and quickstart.sh (installs requirements.txt)",
    "export": "test/conftest.py sets the same ROS_* variables for every test",
    "sudo": "setting up a fleet library's database; personal_vlm_node/testing/postgres.py does the same steps "
            "(a password role, a database, CREATE EXTENSION vector) for test_store_postgres.py",
}
UNCHECKED_PYTHON_MODULES = {
    "venv": "scripts/check_colcon_venv.sh",
    "colcon": "scripts/check_colcon_venv.sh (builds both packages)",
}


# ---- reading the documents ------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    path: Path
    line: int          # first line of the block's body, 1-based
    language: str
    lines: tuple[str, ...]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}"


def blocks_of(path: Path) -> list[Block]:
    found, body, language, start = [], None, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and body is None:
            body, language, start = [], fence.group(1).lower(), number + 1
        elif fence:
            found.append(Block(path, start, language, tuple(body)))
            body = None
        elif body is not None:
            body.append(line)
    assert body is None, f"{path.relative_to(REPO)}: a code block opened at line {start - 1} is never closed"
    return found


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines outside code blocks, numbered."""
    inside, kept = False, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*```", line):
            inside = not inside
        elif not inside:
            kept.append((number, line))
    return kept


def commands_of(block: Block) -> list[tuple[int, list[str]]]:
    """Each command of a shell block as words: continuations joined, comments dropped, and
    ``a && b`` / ``a; b`` / ``a | b`` split into their commands."""
    commands, pending, first = [], "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        command: list[str] = []
        for word in words + [";"]:
            if word in ("&&", "||", ";", "|"):
                if command:
                    commands.append((first, command))
                command = []
            else:
                command.append(word)
    return commands


def all_commands() -> list[tuple[str, list[str]]]:
    return [(_where(block.path, line), words)
            for path in DOC_FILES for block in blocks_of(path) if block.language in SHELL_LANGUAGES
            for line, words in commands_of(block)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors_of(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in prose_lines(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            anchors.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return anchors


# ---- what the code offers --------------------------------------------------------------------

@functools.cache
def interface_fields(kind: str, name: str) -> list[str] | None:
    """The request (srv) or goal (action) field names of an interface, or None if it does not exist."""
    path = INTERFACES / kind / f"{name}.{kind}"
    if not path.is_file():
        return None
    fields = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line == "---":
            break
        if line:
            fields.append(line.split()[1])
    return fields


def _ros_trees() -> list[ast.Module]:
    return [ast.parse(path.read_text(encoding="utf-8")) for path in ROS_SOURCES]


def _interface_imports(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Local name → (srv|action|msg, interface name) for every personal_vlm_interfaces import."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("personal_vlm_interfaces."):
            kind = node.module.split(".")[1]
            for alias in node.names:
                names[alias.asname or alias.name] = (kind, alias.name)
    return names


@functools.cache
def node_endpoints() -> dict[str, dict[str, str]]:
    """What the node's source creates: {"srv": {name: type}, "action": {name: type}, "topic": {name: ""}}.

    Services are the (type, "name", callback) triples the node builds them from; the action and
    topics are the string arguments of ActionServer / create_publisher / create_subscription."""
    found: dict[str, dict[str, str]] = {"srv": {}, "action": {}, "topic": {}}
    for tree in _ros_trees():
        imports = _interface_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and len(node.elts) >= 2:
                kind_name = imports.get(getattr(node.elts[0], "id", None))
                if kind_name and kind_name[0] == "srv" and isinstance(node.elts[1], ast.Constant):
                    found["srv"][node.elts[1].value] = kind_name[1]
            if not isinstance(node, ast.Call):
                continue
            called = getattr(node.func, "attr", getattr(node.func, "id", ""))
            strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if called == "ActionServer" and strings:
                kind_name = imports.get(getattr(node.args[1], "id", None), ("action", "?"))
                found["action"][strings[0]] = kind_name[1]
            elif called in ("create_publisher", "create_subscription", "resolve_topic_name") and strings:
                found["topic"][strings[0]] = ""      # resolve_topic_name: the camera's base topic
    return found


@functools.cache
def launch_arguments() -> dict[str, set[str]]:
    """Launch file name → the arguments it declares (DeclareLaunchArgument names and the keys of
    its parameter-argument table, built from the settings spec)."""
    found = {}
    for path in LAUNCH_DIR.glob("*.launch.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument":
                if node.args and isinstance(node.args[0], ast.Constant):
                    names.add(node.args[0].value)
        # The parameter arguments come from the settings spec: load the file (it imports the
        # launch packages only inside its functions) and read its table.
        spec = importlib.util.spec_from_file_location(path.name.replace(".", "_"), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        names |= set(getattr(module, "PARAMETER_ARGUMENTS", {}))
        found[path.name] = names
    return found


@functools.cache
def quickstart_subcommands() -> set[str]:
    """The words quickstart.sh accepts first: the alternatives of its ``case "$COMMAND" in`` line."""
    text = (REPO / "quickstart.sh").read_text(encoding="utf-8")
    cases = re.search(r'case "\$COMMAND" in\s*\n\s*([\w |]+)\)', text)
    assert cases, "quickstart.sh no longer has its `case \"$COMMAND\" in` line; update test_docs.py"
    return {word.strip() for word in cases.group(1).split("|")}


@functools.cache
def builds_a_parser(module: str) -> bool:
    """Whether the module defines a top-level build_parser() (read from its source: importing it
    could load torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    return any(isinstance(n, ast.FunctionDef) and n.name == "build_parser" for n in tree.body)


# ---- checking one command --------------------------------------------------------------------

def _parses(parser, words: list[str]) -> str | None:
    """Why ``words`` do not parse with ``parser``, or None."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(words)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "argparse refused it"
    return None


def _ros_parameters(words: list[str]) -> list[str]:
    """Problems with every ``-p name:=value`` in words."""
    problems = []
    for flag, value in zip(words, words[1:]):
        if flag in ("-p", "--param"):
            name = value.split(":=", 1)[0]
            if ":=" not in value or name not in PARAMETERS:
                problems.append(f"-p {value}: no node parameter {name!r}")
    return problems


def _check_request(kind: str, type_name: str, request: str | None) -> list[str]:
    match = re.fullmatch(rf"personal_vlm_interfaces/{kind}/(\w+)", type_name)
    fields = interface_fields(kind, match.group(1)) if match else None
    if fields is None:
        return [f"no interface {type_name} under interfaces/personal_vlm_interfaces/{kind}/"]
    if request is None:
        return []
    try:
        values = yaml.safe_load(request)
    except yaml.YAMLError as error:
        return [f"the request {request!r} is not YAML: {error}"]
    unknown = sorted(set(values or {}) - set(fields))
    return [f"{type_name} has no field {', '.join(unknown)} (it has {', '.join(fields)})"] if unknown else []


def _node_relative(name: str) -> str:
    """A topic or service as the docs write it (``/personal_vlm/detections``, ``/ask``) → as the
    node creates it (``~/detections``, ``ask``); absolute names the node creates stay absolute."""
    if name.startswith(f"/{NODE_NAME}/"):
        return "~/" + name[len(NODE_NAME) + 2:]
    return name


def _check_ros2(words: list[str]) -> list[str]:
    verb = words[1:3]
    endpoints = node_endpoints()
    if verb == ["service", "call"]:
        name, type_name, request = words[3], words[4], (words[5] if len(words) > 5 else None)
        created = endpoints["srv"].get(name.rsplit("/", 1)[-1])
        problems = [] if created else [f"the node has no service {name}"]
        if created and not type_name.endswith(f"/{created}"):
            problems.append(f"service {name} is a {created}, not {type_name}")
        return problems + _check_request("srv", type_name, request)
    if verb == ["action", "send_goal"]:
        rest = [w for w in words[3:] if not w.startswith("-")]
        name, type_name, goal = rest[0], rest[1], (rest[2] if len(rest) > 2 else None)
        created = endpoints["action"].get(name.rsplit("/", 1)[-1])
        problems = [] if created else [f"the node has no action {name}"]
        return problems + _check_request("action", type_name, goal)
    if words[1] == "topic":
        name = words[3]
        known = {_node_relative(t) if t.startswith("/") else t for t in endpoints["topic"]}
        return [] if _node_relative(name) in known else [f"the node has no topic {name} (it has {sorted(known)})"]
    if words[1] == "param":
        node, name = words[3], words[4]
        problems = [] if node.rsplit("/", 1)[-1] == NODE_NAME else [f"the node is {NODE_NAME}, not {node}"]
        return problems + ([] if name in PARAMETERS else [f"no node parameter {name!r}"])
    if verb[:1] == ["lifecycle"]:
        node, transition = words[3], words[4]
        problems = [] if node.rsplit("/", 1)[-1] == NODE_NAME else [f"the node is {NODE_NAME}, not {node}"]
        return problems + ([] if transition in LIFECYCLE_TRANSITIONS else [f"no lifecycle transition {transition}"])
    if words[1] == "launch":
        package, launch_file = words[2], words[3]
        declared = launch_arguments().get(launch_file)
        if package != "personal_vlm_node" or declared is None:
            return [f"no launch file {package} {launch_file} (launch/ has {sorted(launch_arguments())})"]
        names = [w.split(":=", 1)[0] for w in words[4:] if ":=" in w]
        return [f"{launch_file} has no argument {n!r}" for n in names if n not in declared]
    if words[1] == "run":
        package, executable, rest = words[2], words[3], words[4:]
        if package != "personal_vlm_node":
            return [f"not this package: {package}"]
        if executable == "personal-vlm":
            problem = _parses(build_parser(), rest)
            return [f"personal-vlm {' '.join(rest)}: {problem}"] if problem else []
        if not (REPO / "scripts" / executable).is_file():
            return [f"the package installs no executable {executable} (see scripts/)"]
        problems = _ros_parameters(rest)
        for flag, value in zip(rest, rest[1:]):
            if flag == "--params-file" and not (REPO / value).is_file():
                problems.append(f"--params-file {value}: no such file in the repository")
        return problems
    return [f"ros2 {' '.join(verb)}: this check does not know the command; teach it or list it in UNCHECKED"]


def _check_python(words: list[str]) -> list[str]:
    if "-m" not in words:
        script = next((w for w in words[1:] if not w.startswith("-")), "")
        return [] if (REPO / script).is_file() else [f"no script {script} in the repository"]
    at = words.index("-m")
    module, rest = words[at + 1], words[at + 2:]
    if module in UNCHECKED_PYTHON_MODULES:
        return []
    if not module.startswith("personal_vlm_node") or importlib.util.find_spec(module) is None:
        return [f"no module {module}"]
    if builds_a_parser(module):
        problem = _parses(importlib.import_module(module).build_parser(), rest)
        return [f"{module} {' '.join(rest)}: {problem}"] if problem else []
    return []


def _check_test_arguments(words: list[str]) -> list[str]:
    """pytest arguments that name test files must name existing ones."""
    return [f"no test file {w}" for w in words
            if w.startswith("test/") and not (REPO / w.split("::", 1)[0]).exists()]


def problems_of(words: list[str]) -> list[str]:
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]                       # VAR=value before a command
    program = words[0]
    name = Path(program).name
    if program == "personal-vlm":
        problem = _parses(build_parser(), words[1:])
        return [problem] if problem else []
    if program == "./quickstart.sh":
        sub, rest = (words[1] if len(words) > 1 else ""), words[2:]
        if sub not in quickstart_subcommands():
            return [f"quickstart.sh has no {sub!r} (it has {', '.join(sorted(quickstart_subcommands()))})"]
        return _ros_parameters(rest) if sub == "node" else _check_test_arguments(rest)
    if program == ".ci/run":
        forwards = 'exec ./quickstart.sh test "$@"' in (REPO / ".ci" / "run").read_text(encoding="utf-8")
        return _check_test_arguments(words[1:]) if forwards else [".ci/run no longer runs ./quickstart.sh test"]
    if program == "ros2":
        return _check_ros2(words)
    if re.fullmatch(r"python(3(\.\d+)?)?", name):
        return _check_python(words)
    if program.startswith(("scripts/", "./scripts/")):
        return [] if (REPO / program).is_file() else [f"no script {program}"]
    if name in UNCHECKED:
        return []
    return [f"{program}: this check does not know the command; teach it or list it in UNCHECKED"]


# ---- the tests ---------------------------------------------------------------------------------

COMMANDS = all_commands()


@pytest.mark.parametrize("where, words", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_exists_as_written(where, words):
    problems = problems_of(words)
    assert not problems, f"{where}: `{shlex.join(words)}`: " + "; ".join(problems)


def test_documented_python_examples_compile():
    for path in DOC_FILES:
        for block in blocks_of(path):
            if block.language == "python":
                compile("\n".join(block.lines), _where(path, block.line), "exec")


def broken_links(paths) -> list[str]:
    broken = []
    for path in paths:
        for number, line in prose_lines(path):
            line = re.sub(r"`[^`]*`", "", line)         # code spans hold no links
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue                             # https:, mailto:
                file_part, _, anchor = target.partition("#")
                resolved = (path.parent / file_part).resolve() if file_part else path
                if not resolved.exists():
                    broken.append(f"{_where(path, number)}: {target}: no such file")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
                    broken.append(f"{_where(path, number)}: {target}: no heading with that anchor")
    return broken


def test_every_relative_link_and_anchor_resolves():
    broken = broken_links(DOC_FILES)
    assert not broken, "\n".join(broken)


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Building `personal_vlm_node`: colcon\n\n"
                    "[ok](#building-personal_vlm_node-colcon) [bad](#building) [gone](missing.md) "
                    "`[code](nowhere.md)`\n", encoding="utf-8")
    assert [line.split(": ", 1)[1] for line in broken_links([page])] == [
        "#building: no heading with that anchor", "missing.md: no such file"]


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_quick_start_block_holds_exactly_the_two_commands():
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no `## Quick start` section"
    start = text[:section.start()].count("\n") + 2
    first = next(b for b in blocks_of(readme) if b.line >= start)
    assert [" ".join(words) for _, words in commands_of(first)] == QUICK_START


def test_parameter_table_lists_every_node_parameter_once():
    text = (REPO / "docs" / "ros.md").read_text(encoding="utf-8")
    region = re.search(r"<!-- parameters:begin -->\n(.*?)<!-- parameters:end -->", text, re.S)
    assert region, "docs/ros.md lacks the <!-- parameters:begin/end --> region"
    rows = [line.split("|")[1] for line in region.group(1).splitlines() if line.startswith("| `")]
    listed = [name for cell in rows for name in re.findall(r"`(\w+)`", cell)]
    assert sorted(listed) == sorted(PARAMETERS)


def test_the_checks_see_the_nodes_interfaces():
    # Guards the checks themselves: if the node's source changed shape, they would pass vacuously.
    endpoints = node_endpoints()
    assert endpoints["srv"] == {"teach_concept": "TeachConcept", "ask": "Ask",
                                "list_concepts": "ListConcepts", "forget_concept": "ForgetConcept"}
    assert endpoints["action"] == {"ask": "Ask"}
    assert {"image", "~/detections", "~/overlay", "/diagnostics"} <= set(endpoints["topic"])
    assert {"image", "params_file", "lifecycle", "model"} <= launch_arguments()["assistant.launch.py"]
    assert quickstart_subcommands() == {"node", "test"}


def test_a_wrong_command_is_caught():
    assert problems_of(["personal-vlm", "teach"])
    assert problems_of(["personal-vlm", "teach", "x", "a.jpg", "--colour", "red"])
    assert problems_of(["ros2", "service", "call", "/teach", "personal_vlm_interfaces/srv/TeachConcept"])
    assert problems_of(["ros2", "service", "call", "/ask", "personal_vlm_interfaces/srv/Ask", "{query: 'x'}"])
    assert problems_of(["ros2", "param", "set", "/personal_vlm", "max_memory_tokens", "32"])
    assert problems_of(["./quickstart.sh", "node", "-p", "modle:=/tmp/tiny"])
    assert problems_of(["./quickstart.sh", "build"])
    assert problems_of(["python", "-m", "personal_vlm_node.testing.toy_wrld", "out"])
    assert problems_of(["ros2", "launch", "personal_vlm_node", "assistant.launch.py", "camera:=/x"])
    assert problems_of(["make", "all"])
