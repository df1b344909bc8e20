"""The Snakefile and rule files: snakemake --lint, snakefmt, and one layout for every rule.

Every rule that runs something logs to logs/<rule>/ and benchmarks to benchmarks/<rule>/
(file name: the wildcard values, or the rule name when it has none); the training rules
declare their resume state as params.state under results/<stage>/; the scripts call their
stage function with keyword arguments only.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "workflow" / "rules"
SCRIPTS = REPO / "workflow" / "scripts"
SNAKE_FILES = ["Snakefile", *sorted(str(p.relative_to(REPO)) for p in RULES.glob("*.smk"))]
# directives that make a rule run something (a rule without one, like `all`, only collects inputs)
ACTIONS = {"script", "shell", "run", "notebook", "wrapper", "cwl"}
# training rule -> the results/ folder of its stage and its resume state
STATES = {
    "sft": "results/sft/state.pt",
    "train_reward": "results/reward/state.pt",
    "align": "results/align/{run}/state.pt",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- parsing


def rule_blocks() -> dict[str, dict[str, str]]:
    """Rule name -> {directive: its text} for every `rule` in workflow/rules/*.smk and the Snakefile."""
    rules = {}
    for name in SNAKE_FILES:
        lines = (REPO / name).read_text().splitlines()
        i = 0
        while i < len(lines):
            match = re.fullmatch(r"rule (\w+):\s*", lines[i])
            i += 1
            if not match:
                continue
            directives, current = {}, None
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                line = lines[i]
                head = re.fullmatch(r" {4}(\w+):(.*)", line)
                if head:
                    current = head.group(1)
                    directives[current] = head.group(2).strip()
                elif current is not None:
                    directives[current] += "\n" + line
                i += 1
            assert match.group(1) not in rules, f"rule {match.group(1)} defined twice"
            rules[match.group(1)] = directives
    return rules


def call_arguments(text: str) -> tuple[list[ast.expr], dict[str, ast.expr]]:
    """A directive's entries, parsed as the arguments of a call: (positional, keyword)."""
    call = ast.parse(f"f(\n{text}\n)", mode="eval").body
    return call.args, {kw.arg: kw.value for kw in call.keywords}


def single_path(rule: str, directive: str, text: str) -> str:
    args, kwargs = call_arguments(text)
    entries = args + list(kwargs.values())
    assert len(entries) == 1, f"rule {rule}: expected one {directive} file, got {text.strip()!r}"
    assert isinstance(entries[0], ast.Constant) and isinstance(entries[0].value, str), (
        f"rule {rule}: {directive} should be a plain path, got {text.strip()!r}"
    )
    return entries[0].value


def common_helpers() -> dict:
    """The plain helper functions of common.smk that need neither config nor workflow."""
    lines = (RULES / "common.smk").read_text().splitlines()
    namespace: dict = {}
    for name in ("get_state",):
        start = lines.index(next(line for line in lines if line.startswith(f"def {name}(")))
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
        exec(compile("\n".join(lines[start:end]), "common.smk", "exec"), namespace)
    return namespace


def evaluate_param(node: ast.expr, helpers: dict):
    """A params entry made of literals and calls of common.smk's helpers."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers:
        return helpers[node.func.id](*(ast.literal_eval(arg) for arg in node.args))
    return ast.literal_eval(node)


@pytest.fixture(scope="module")
def rules():
    return rule_blocks()


# --------------------------------------------------------------------------- lint and format


def test_lint_is_clean():
    out = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Lints for" not in text and "Congratulations" in text, text


def test_snakefmt_is_clean():
    if importlib.util.find_spec("snakefmt") is None:
        if in_ci():
            pytest.fail("snakefmt is not installed (install the `test` extra)")
        pytest.skip("snakefmt is not installed (part of the `test` extra)")
    out = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--diff", *SNAKE_FILES], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"run `snakefmt Snakefile workflow/rules`:\n{out.stdout}\n{out.stderr}"


# --------------------------------------------------------------------------- one layout for every rule


def test_parsed_rules_are_the_workflow_rules(rules):
    out = subprocess.run([sys.executable, "-m", "snakemake", "--list-rules"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(rules) == set(out.stdout.split())
    assert set(STATES) <= set(rules)


def test_every_rule_logs_and_benchmarks_under_its_name(rules):
    wrong = []
    for rule, directives in rules.items():
        if not ACTIONS & set(directives):
            if "log" in directives or "benchmark" in directives:
                wrong.append(f"rule {rule} runs nothing but has a log or benchmark")
            continue
        if "log" not in directives or "benchmark" not in directives:
            wrong.append(f"rule {rule} needs log: and benchmark:")
            continue
        log = single_path(rule, "log", directives["log"])
        benchmark = single_path(rule, "benchmark", directives["benchmark"])
        stem = log[len(f"logs/{rule}/"):-len(".log")]
        if "{" in stem:
            # the wildcard values name the file
            name_ok = re.fullmatch(r"\{\w+\}([_.-]\{\w+\})*", stem) is not None
        else:
            name_ok = stem == rule
        if not (log.startswith(f"logs/{rule}/") and log.endswith(".log") and name_ok):
            wrong.append(f"rule {rule}: log {log!r}, expected logs/{rule}/<wildcards or {rule}>.log")
        elif benchmark != f"benchmarks/{rule}/{stem}.tsv":
            wrong.append(f"rule {rule}: benchmark {benchmark!r}, expected benchmarks/{rule}/{stem}.tsv")
    assert not wrong, "\n".join(wrong)


def test_training_rules_declare_their_state(rules):
    helpers = common_helpers()
    for rule, expected in STATES.items():
        directives = rules[rule]
        _, params = call_arguments(directives.get("params", ""))
        assert "state" in params, f"rule {rule} should declare params.state"
        state = evaluate_param(params["state"], helpers)
        assert state == expected, f"rule {rule}: params.state {state!r}, expected {expected!r}"
        # beside the directory() outputs, which Snakemake deletes when a job fails
        _, outputs = call_arguments(directives["output"])
        for node in outputs.values():
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "directory":
                folder = ast.literal_eval(node.args[0])
                assert not state.startswith(folder.rstrip("/") + "/"), f"rule {rule}: state inside {folder}"
        script = ast.literal_eval(call_arguments(directives["script"])[0][0])
        text = (RULES / script).resolve().read_text()
        assert "state_path=snakemake.params.state" in text, f"{script} should pass snakemake.params.state"


def test_scripts_call_stages_with_keywords_only():
    checked = 0
    for path in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        stages = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and node.module == "fdpipe.stages" for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in stages):
                checked += 1
                assert not node.args, f"{path.name}:{node.lineno}: call {node.func.value.id}.{node.func.attr} " \
                                      "with keyword arguments only"
    assert checked >= 9
