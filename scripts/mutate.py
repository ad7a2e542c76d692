"""Mutation testing of the core modules with cosmic-ray, each module against the tests that should catch its bugs.

    python scripts/mutate.py                              # every target, 10 min each (= make mutate)
    python scripts/mutate.py --only kvzip_jax/kvzip/select.py --budget 1800
    python scripts/mutate.py --list                       # the targets and their tests
    python scripts/mutate.py --recheck --only kvzip_jax/kvzip/select.py   # survivors again, after new tests

For each target module: copy the tracked tree into build/mutate/<module> (mutations never touch the working tree),
run its tests once unmutated (they must pass; their time sets cosmic-ray's per-mutant timeout), then let cosmic-ray
apply one mutation at a time and run those tests, until every mutant ran or the module's time budget is spent.
cosmic-ray runs pending mutants in random order, so a budget cut leaves a uniform random sample. A rerun with the
module and its tests unchanged continues the same session; any change starts it over.

Writes docs/mutation/report.md (per module: mutants, run, killed, survived, score = killed / run) and
docs/mutation/survivors/<module>.md (each surviving mutant's diff). A line marked `# pragma: no mutate` is not
mutated: use it only with a comment that says why a survivor there is equivalent or harmless.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import subprocess
import sys
import time

from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> the tests that own it. Kernel tests are limited to the reference paths (-k): the Pallas kernels in
# interpret mode are covered by their own comparisons against these references.
TARGETS: dict[str, list[str]] = {
    "kvzip_jax/kvzip/select.py": ["tests/kvzip_jax/test_kvzip_select.py"],
    "kvzip_jax/kvzip/compressor.py": ["tests/kvzip_jax/test_kvzip_cache.py"],
    "kvzip_jax/kvzip/compact.py": ["tests/kvzip_jax/test_kvzip_cache.py"],
    "kvzip_jax/kvzip/scoring.py": ["tests/kvzip_jax/test_kvzip_scoring.py"],
    "kvzip_jax/kvzip/prompts.py": ["tests/kvzip_jax/test_kvzip_prompts.py"],
    "kvzip_jax/kvzip/baselines.py": ["tests/kvzip_jax/test_kvzip_baselines.py"],
    "kvzip_jax/cache.py": ["tests/kvzip_jax/test_bad_input.py", "tests/kvzip_jax/test_kvzip_cache.py",
                           "tests/kvzip_jax/test_generation.py"],
    "kvzip_kernels/paged_attention.py": ["tests/kvzip_kernels/test_paged_attention.py", "-k", "not pallas"],
    "kvzip_kernels/kvzip_scores.py": ["tests/kvzip_kernels/test_kvzip_scores.py", "-k", "not pallas"],
    "serving/policies.py": ["tests/serving/test_serving_policies.py", "tests/serving/test_serving_simulator.py"],
    "serving/elasticmm.py": ["tests/serving/test_serving_policies.py", "tests/serving/test_serving_simulator.py"],
    "serving/prefix_cache.py": ["tests/serving/test_serving_prefix_cache.py"],
}


# Operator variants left out (marked skipped): swaps into bit shifts, bitwise ops, powers and modulo of numeric code,
# and `is` / `is not` in place of an ordering, are killed by any test that runs the line or crash at once; they
# roughly double the mutant count for little information. Each pattern is matched against cosmic-ray's name.
EXCLUDED_OPERATORS = (
    r"core/ReplaceBinaryOperator_\w+_(Pow|RShift|LShift|BitOr|BitAnd|BitXor|Mod)$",
    r"core/ReplaceComparisonOperator_(Lt|LtE|Gt|GtE)_(Is|IsNot)$",
)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(REPO, p))]


def fingerprint(module: str, tests: list[str]) -> str:
    """Hash of the module, its tests and the operator filter: a session continues only while all are unchanged."""
    h = hashlib.sha256(repr(EXCLUDED_OPERATORS).encode())
    paths = [module] + [t for t in tests if not t.startswith("-") and os.path.exists(os.path.join(REPO, t))]
    for path in paths:
        full = os.path.join(REPO, path)
        files = [full] if os.path.isfile(full) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".py"))
        for f in files:
            h.update(f.encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def copy_tree(dest: str):
    for path in tracked_files():
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPO, path), target)


def test_command(tests: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def annotation_spans(path: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) (line, column) spans of every type annotation in a module that has `from __future__ import
    annotations`: there annotations are strings that nothing evaluates at run time, so a mutant inside one (`str |
    None` -> `str / None`) is equivalent by construction. Empty for modules without that import."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    if not future:
        return []
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            nodes.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            nodes.append(node.returns)
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in nodes]


def in_annotation(spans, position: tuple[int, int]) -> bool:
    return any(start <= tuple(position) < end for start, end in spans)


def skip_annotation_mutants(session: str, module_path: str):
    """Mark pending mutants inside annotations as skipped, so the budget goes to mutants that can matter."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(module_path)
    with use_db(session, WorkDB.Mode.open) as db:
        ids = [item.job_id for item in db.pending_work_items
               if all(in_annotation(spans, m.start_pos) for m in item.mutations)]
        if ids:
            db.set_multiple_results(ids, WorkResult(output="inside a type annotation (never evaluated)",
                                                    worker_outcome=WorkerOutcome.SKIPPED))


def write_config(path: str, module: str, tests: list[str], timeout: float):
    quoted = " ".join(f"'{a}'" if " " in a else a for a in test_command(tests))
    with open(path, "w") as f:
        f.write("[cosmic-ray]\n")
        f.write(f'module-path = "{module}"\n')
        f.write(f"timeout = {timeout:.0f}\n")
        f.write("excluded-modules = []\n")
        f.write(f'test-command = "{quoted}"\n')
        f.write('[cosmic-ray.distributor]\nname = "local"\n')
        f.write("[cosmic-ray.filters.operators-filter]\n")
        f.write("exclude-operators = [" + ", ".join(toml_string(p) for p in EXCLUDED_OPERATORS) + "]\n")


def module_home(workdir: str, module: str) -> str:
    return os.path.join(workdir, module.replace("/", "_").removesuffix(".py"))


def tool(name: str) -> str:
    """cosmic-ray's commands, from the environment this script runs in."""
    return os.path.join(os.path.dirname(sys.executable), name)


def run_module(module: str, tests: list[str], budget: float, workdir: str):
    """Run (or continue) one module's session until every mutant ran or the budget is spent."""
    home = module_home(workdir, module)
    os.makedirs(home, exist_ok=True)
    session = os.path.join(home, "session.sqlite")
    stamp_path = os.path.join(home, "fingerprint")
    stamp = fingerprint(module, tests)
    fresh = not (os.path.exists(session) and os.path.exists(stamp_path) and open(stamp_path).read() == stamp)
    tree = os.path.join(home, "tree")
    shutil.rmtree(tree, ignore_errors=True)  # also undoes a mutation left applied by a run cut at its budget
    copy_tree(tree)

    t0 = time.perf_counter()
    base = subprocess.run(test_command(tests), cwd=tree, capture_output=True, text=True)
    baseline_s = time.perf_counter() - t0
    if base.returncode != 0:
        raise SystemExit(f"{module}: its tests fail before any mutation:\n{base.stdout[-3000:]}{base.stderr[-2000:]}")
    with open(os.path.join(home, "baseline_s"), "w") as f:
        f.write(f"{baseline_s:.2f}")
    config = os.path.join(home, "config.toml")
    write_config(config, module, tests, timeout=max(3 * baseline_s, 30.0))
    if fresh:
        if os.path.exists(session):
            os.remove(session)
        subprocess.run([tool("cosmic-ray"), "init", config, session], cwd=tree, check=True, capture_output=True)
        subprocess.run([tool("cr-filter-pragma"), session], cwd=tree, check=True, capture_output=True)
        subprocess.run([tool("cr-filter-operators"), session, config], cwd=tree, check=True, capture_output=True)
        with open(stamp_path, "w") as f:
            f.write(stamp)

    skip_annotation_mutants(session, os.path.join(tree, module))
    started = time.perf_counter()
    proc = subprocess.Popen([tool("cosmic-ray"), "exec", config, session], cwd=tree, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        kill_processes_in(tree)
    spent_path = os.path.join(home, "spent_s")  # mutant time summed over every run of this session
    spent = float(open(spent_path).read()) if not fresh and os.path.exists(spent_path) else 0.0
    with open(spent_path, "w") as f:
        f.write(f"{spent + time.perf_counter() - started:.1f}")


def kill_processes_in(tree: str):
    """cosmic-ray starts each mutant's tests in a session of their own, which killing `exec` does not reach: end
    every process still working in the copied tree (Linux /proc), or a mutant that loops would run on for ever."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == tree or cwd.startswith(tree + os.sep):
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


def recheck_survivors(module: str, tests: list[str], workdir: str) -> int:
    """Run every surviving mutant of a module's session again against the current tests (after new tests were
    written for them), keeping the session; returns how many were rechecked. The module's source must still parse
    to the same mutation sites (comments may change), as cosmic-ray addresses a mutant by its occurrence."""
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    home = module_home(workdir, module)
    session = os.path.join(home, "session.sqlite")
    if not os.path.exists(session):
        return 0
    tree = os.path.join(home, "tree")
    shutil.rmtree(tree, ignore_errors=True)
    copy_tree(tree)
    with open(os.path.join(home, "baseline_s")) as f:
        timeout = max(3 * float(f.read()), 30.0)
    quoted = " ".join(f"'{a}'" if " " in a else a for a in test_command(tests))
    here = os.getcwd()
    os.chdir(tree)  # cosmic-ray applies mutations to module paths relative to the working directory
    try:
        with use_db(session, WorkDB.Mode.open) as db:
            survivors = [item for item, result in db.completed_work_items
                         if result.test_outcome == TestOutcome.SURVIVED]
            for item in survivors:
                db.set_result(item.job_id, mutate_and_test(item.mutations, quoted, timeout))
    finally:
        os.chdir(here)
        kill_processes_in(tree)
    with open(os.path.join(home, "fingerprint"), "w") as f:
        f.write(fingerprint(module, tests))  # the session now stands for the current tests
    return len(survivors)


def pragma_lines(path: str) -> set[int]:
    with open(path) as f:
        return {i for i, line in enumerate(f, 1) if "pragma: no mutate" in line}


def collect(module: str, workdir: str) -> dict | None:
    """Counts and survivors of a module's session so far (None if it never ran)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    home = module_home(workdir, module)
    session = os.path.join(home, "session.sqlite")
    if not os.path.exists(session):
        return None
    with open(os.path.join(home, "baseline_s")) as f:
        baseline_s = float(f.read())
    spent_path = os.path.join(home, "spent_s")
    spent_s = float(open(spent_path).read()) if os.path.exists(spent_path) else float("nan")
    with use_db(session, WorkDB.Mode.open) as db:
        total = db.num_work_items
        done = db.completed_work_items
    spans = annotation_spans(os.path.join(REPO, module))
    pragmas = pragma_lines(os.path.join(REPO, module))
    killed = survived = incompetent = skipped = 0
    survivors = []
    for item, result in done:
        # Mutants run before the annotation filter or a line's pragma existed count as skipped too: the filters'
        # rules, applied late.
        if result.worker_outcome == WorkerOutcome.SKIPPED or all(
                in_annotation(spans, m.start_pos) or m.start_pos[0] in pragmas for m in item.mutations):
            skipped += 1
        elif result.test_outcome == TestOutcome.KILLED:
            killed += 1
        elif result.test_outcome == TestOutcome.SURVIVED:
            survived += 1
            m = item.mutations[0]
            survivors.append((m.start_pos[0], m.operator_name, result.diff))
        else:
            incompetent += 1
    return dict(module=module, total=total, skipped=skipped, run=killed + survived, killed=killed,
                survived=survived, incompetent=incompetent, baseline_s=baseline_s, spent_s=spent_s,
                survivors=sorted(survivors))


def write_reports(results: list[dict], out: str):
    os.makedirs(os.path.join(out, "survivors"), exist_ok=True)
    lines = [
        "# Mutation testing report",
        "",
        f"Written by `python scripts/mutate.py` (`make mutate`) on {datetime.date.today()} with cosmic-ray. "
        "`time` = seconds of mutant runs so far, within each run's budget per module. `run` = mutants whose tests "
        "ran to an end (a random sample "
        "when the budget cut the session); `score` = killed / run; `skipped` = lines marked `# pragma: no mutate`, "
        "the operator variants the script leaves out (`EXCLUDED_OPERATORS`) and mutants inside type annotations.",
        "",
        "| module | mutants | run | killed | survived | skipped | score | time (s) | tests' time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        score = f"{r['killed'] / r['run']:.1%}" if r["run"] else "n/a"
        lines.append(f"| `{r['module']}` | {r['total']} | {r['run']} | {r['killed']} | {r['survived']} | "
                     f"{r['skipped']} | {score} | {r['spent_s']:.0f} | {r['baseline_s']:.1f} |")
        name = r["module"].replace("/", "_").removesuffix(".py")
        body = [f"# Surviving mutants of `{r['module']}`", "",
                f"{r['survived']} of {r['run']} mutants run survived `{' '.join(TARGETS[r['module']])}`.", ""]
        for line, operator, diff in r["survivors"]:
            body += [f"## line {line}: {operator}", "", "```diff", diff.strip(), "```", ""]
        with open(os.path.join(out, "survivors", f"{name}.md"), "w") as f:
            f.write("\n".join(body))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="target modules to run (default: all)")
    p.add_argument("--budget", type=float, default=600.0, help="seconds of mutants per module (default 600)")
    p.add_argument("--workdir", default=os.path.join(REPO, "build", "mutate"))
    p.add_argument("--out", default=os.path.join(REPO, "docs", "mutation"))
    p.add_argument("--list", action="store_true", help="print the targets and their tests, then exit")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the sessions so far")
    p.add_argument("--recheck", action="store_true",
                   help="run the surviving mutants of --only (default: all) against the current tests, then report")
    args = p.parse_args(argv)
    if args.list:
        for module, tests in TARGETS.items():
            print(f"{module}: {' '.join(tests)}")
        return
    if args.recheck:
        for module in tqdm(list(TARGETS) if args.only is None else args.only, desc="rechecking survivors"):
            recheck_survivors(module, TARGETS[module], args.workdir)
    if args.report or args.recheck:
        write_reports([r for r in (collect(m, args.workdir) for m in TARGETS) if r is not None], args.out)
        return
    modules = list(TARGETS) if args.only is None else args.only
    unknown = [m for m in modules if m not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; targets: {', '.join(TARGETS)}")
    if args.budget <= 0:
        raise SystemExit(f"--budget must be > 0 seconds, got {args.budget}")
    for module in tqdm(modules, desc="modules"):
        run_module(module, TARGETS[module], args.budget, args.workdir)
        # After every module, over every session so far, so a cut or partial run still leaves a whole report.
        results = [r for r in (collect(m, args.workdir) for m in TARGETS) if r is not None]
        write_reports(results, args.out)
        r = collect(module, args.workdir)
        tqdm.write(f"{module}: {r['killed']} of {r['run']} mutants run killed ({r['total']} in all)")


if __name__ == "__main__":
    main()
