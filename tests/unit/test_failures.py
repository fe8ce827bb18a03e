"""Every failure kind and exit status comes from captionfleet.core.failures, and from nowhere else.

A kind spelled out in a second module drifts: the metrics would not create its series at 0 (rate()
misses its first burst) and bulk runs would refuse it in --retry-failed. An exit status defined twice
drifts from what k8s/base/bulk-job.yaml's podFailurePolicy and the README promise.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import captionfleet
from captionfleet.core import failures

PACKAGE = Path(captionfleet.__file__).resolve().parent
HOME = "captionfleet.core.failures"
# Calls whose argument is a failure kind: (callable name, index of the kind argument).
KIND_ARGUMENT = {"ImageError": 0, "FetchError": 0, "TransientFetchError": 0, "_failure": 1}


def modules() -> Iterator[tuple[Path, ast.Module]]:
    """Every module of the installed namespace; worker/, trainer/ and dashboard/ are linked into it."""
    for folder, _dirs, files in os.walk(PACKAGE, followlinks=True):
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(folder, name)
                yield path, ast.parse(path.read_text(), filename=str(path))


def imported_from_home(tree: ast.Module) -> set[str]:
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == HOME
        for alias in node.names
    }


def assigned_names(node: ast.AST) -> Iterator[tuple[str, ast.expr | None]]:
    if isinstance(node, ast.Assign):
        for target in node.targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            yield from ((n.id, node.value) for n in names if isinstance(n, ast.Name))
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        yield node.target.id, node.value


def test_the_walk_sees_every_part() -> None:
    seen = {path.relative_to(PACKAGE).parts[0] for path, _ in modules()}
    assert {"core", "worker", "trainer", "dashboard", "cli.py"} <= seen


def test_the_metrics_create_a_series_for_exactly_the_failure_kinds() -> None:
    from captionfleet.worker.metrics import WorkerMetrics

    registry = WorkerMetrics().registry
    series = {
        sample.labels["kind"]
        for metric in registry.collect()
        if metric.name == "captionfleet_failures"
        for sample in metric.samples
        if sample.name == "captionfleet_failures_total"
    }
    assert series == failures.FAILURE_KINDS


def test_bulk_runs_accept_exactly_the_failure_kinds_in_retry_failed() -> None:
    from captionfleet.worker import bulk_s3

    assert bulk_s3.FAILURE_KINDS is failures.FAILURE_KINDS


def kind_expressions(tree: ast.Module) -> Iterator[ast.expr]:
    """What a module hands on as a failure kind: the kind argument of the calls above, and what its
    ``*failure_kind`` functions return (the pipeline maps exceptions to kinds). The trainer's reasons
    for skipping a training image (``missing``, ``unreadable``) are its own words, not failure kinds."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if func in KIND_ARGUMENT and len(node.args) > KIND_ARGUMENT[func]:
                yield node.args[KIND_ARGUMENT[func]]
        elif isinstance(node, ast.FunctionDef) and node.name.endswith("failure_kind"):
            yield from (ret.value for ret in ast.walk(node) if isinstance(ret, ast.Return) and ret.value)


def test_every_kind_raised_or_recorded_is_a_failure_kind_from_the_one_module() -> None:
    # The decoder's kinds are literals checked by mypy against ImageFailureKind; every other kind is a
    # constant imported from core.failures (or passed on from an error that already carries one).
    problems = []
    for path, tree in modules():
        home_names = imported_from_home(tree) if path.name != "failures.py" else set(vars(failures))
        for kind in kind_expressions(tree):
            where = f"{path.relative_to(PACKAGE)}:{kind.lineno}"
            if isinstance(kind, ast.Constant) and kind.value not in failures.FAILURE_KINDS:
                problems.append(f"{where}: {kind.value!r} is not in FAILURE_KINDS")
            if isinstance(kind, ast.Name) and kind.id.isupper() and kind.id not in home_names:
                problems.append(f"{where}: {kind.id} does not come from {HOME}")
    assert not problems, problems


def test_no_module_but_the_one_spells_out_a_failure_kind_as_a_constant() -> None:
    problems = []
    for path, tree in modules():
        if path.name == "failures.py" and path.parent.name == "core":
            continue
        for node in ast.walk(tree):
            for name, value in assigned_names(node):
                if name.isupper() and isinstance(value, ast.Constant) and value.value in failures.FAILURE_KINDS:
                    problems.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {name} = {value.value!r}")
    assert not problems, problems


def test_no_module_but_the_one_defines_an_exit_status() -> None:
    problems = []
    for path, tree in modules():
        if path.name == "failures.py" and path.parent.name == "core":
            continue
        for node in ast.walk(tree):
            problems += [
                f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}"
                for name, _ in assigned_names(node)
                if name.startswith("EXIT_")
            ]
            # The statuses with a meaning beyond success and failure are never written as numbers.
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and node.value.value in (75, 130):
                problems.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: return {node.value.value}")
    assert not problems, problems


def test_the_exit_statuses_keep_their_numbers() -> None:
    # k8s/base/bulk-job.yaml fails the Job on 2 and retries the index on anything else; the README
    # documents 0/2/3/75/130 for `captionfleet caption` and 0/1/2/75 for the stream worker.
    assert (failures.EXIT_OK, failures.EXIT_FAILED, failures.EXIT_USAGE, failures.EXIT_SOME_FAILED) == (0, 1, 2, 3)
    assert failures.EXIT_TEMPFAIL == failures.EXIT_GRACE_EXCEEDED == 75
    # `captionfleet train --publish-to` and `models import`: stored but not made LATEST, and LATEST
    # unusable; k8s/base/trainer-cronjob.yaml fails the Job on both instead of training again.
    assert (failures.EXIT_REJECTED, failures.EXIT_LATEST_UNUSABLE) == (4, 5)
    assert failures.EXIT_INTERRUPTED == 130


def test_the_trainer_cronjob_fails_its_job_on_the_statuses_a_retry_would_repeat() -> None:
    import yaml

    manifest = Path(__file__).resolve().parents[2] / "k8s" / "base" / "trainer-cronjob.yaml"
    job = yaml.safe_load(manifest.read_text())["spec"]["jobTemplate"]["spec"]
    fail_job = {
        code
        for rule in job["podFailurePolicy"]["rules"]
        if rule["action"] == "FailJob"
        for code in rule["onExitCodes"]["values"]
    }
    # Training again would end the same way; 1 (the store failed) is still retried.
    assert fail_job == {failures.EXIT_USAGE, failures.EXIT_REJECTED, failures.EXIT_LATEST_UNUSABLE}
