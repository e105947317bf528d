#!/usr/bin/env python3
"""Mutation testing of the privacy, loading and search modules with mutmut (outside CI: it takes long).

    .venv/bin/python scripts/mutation_test.py [GROUP ...] [--report MUTATION.md] [--max-children 2] [--only PATTERN]

Each GROUP (default: all) names modules and the tests that should kill their mutants. The repository's tracked
files are copied to a scratch directory (the work tree is never touched), a setup.cfg [mutmut] section is written
there, `mutmut run` mutates the group's modules and runs its tests against every mutant, and `mutmut results`
lists the survivors. The report (markdown) gets the score killed / (killed + survived) per group, mutmut's own
result lines, and every surviving mutant's diff, so each one either gets a test or a written reason.
A group may name `only`: fnmatch patterns of mutant names (e.g. `fhirsynth.model.train.x_epsilons*`), so that
only those functions of a large module are mutated and counted; `--only` does the same from the command line, to
re-measure the functions with the most survivors without rerunning a whole group.
mutmut is installed into the running interpreter's environment when missing (it is not a project dependency).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("mutation_test")

GROUPS: dict[str, dict[str, list[str]]] = {
    "loader": {"mutate": ["fhirsynth/export/loader.py", "fhirsynth/export/loadplan.py"],
               "tests": ["tests/test_load.py", "tests/test_load_units.py", "tests/test_loadplan.py",
                         "tests/test_load_server_ids.py", "tests/test_load_answers.py"]},
    "search": {"mutate": ["fhirsynth/store/params.py", "fhirsynth/store/query.py"],
               "tests": ["tests/test_search_semantics.py", "tests/test_search_separation.py", "tests/test_api_search.py",
                         "tests/test_api_sort.py", "tests/test_api_errors.py", "tests/test_store.py"]},
    # The privacy path: the DP noise and its calibration, the OS-CSPRNG noise and sampling, the vocabulary's budget
    # split and sex-marginal release, and train.py's budget, accountant and Opacus set-up (only those functions: the
    # rest of train.py is the training loop). Fast tests only: they rerun for every mutant. dpbins.py (the value-bin
    # release) is its own group: its tests build vocabularies and take seconds each.
    "privacy": {"mutate": ["fhirsynth/model/dpnoise.py", "fhirsynth/model/securerng.py", "fhirsynth/model/vocab.py",
                           "fhirsynth/model/train.py", "fhirsynth/model/composition.py"],
                "only": ["fhirsynth.model.dpnoise.*", "fhirsynth.model.securerng.*", "fhirsynth.model.composition.*",
                         "fhirsynth.model.vocab.x_split_preprocessing*", "fhirsynth.model.vocab.x_sex_epsilon*",
                         "fhirsynth.model.vocab.x_release_sex_shares*",
                         *(f"fhirsynth.model.train.x_{f}*" for f in (
                             "default_delta", "_validate", "steps_per_epoch_for", "_budget_split", "epsilons",
                             "accounted_steps", "make_private", "_privacy_report"))],
                "tests": ["tests/test_privacy_units.py", "tests/test_securerng.py", "tests/test_privacy_wiring.py",
                          "tests/test_composition.py",
                          "tests/test_privacy_guarantee.py::test_accountant_rate_and_steps_are_the_loops",
                          "tests/test_privacy_guarantee.py::test_noise_reaching_the_weights_has_std_sigma_times_clip",
                          "tests/test_privacy_guarantee.py::test_empty_first_poisson_batch_is_a_noise_only_step"]},
    # the calibration statistics released at train time and the reweighting of generate (issue 15)
    "calibration": {"mutate": ["fhirsynth/model/measurements.py", "fhirsynth/model/calibrate.py",
                               "fhirsynth/model/repair.py"],
                    "tests": ["tests/test_calibrate_units.py", "tests/test_measurements_units.py",
                              "tests/test_calibrate.py", "tests/test_repair.py", "tests/test_repair_units.py"]},
    "dpbins": {"mutate": ["fhirsynth/model/dpbins.py"],
               "tests": ["tests/test_privacy_units.py", "tests/test_dpbins.py", "tests/test_dpbins_units.py"]},
}


def ensure_mutmut() -> Path:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "mutmut>=3.3"], check=True)
    return exe


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # the FHIR JSON schema and packages the validation tests read are fetched, not tracked; the Medplum install
    # (hundreds of MB, links inside) serves only tests no group runs
    for name in ("fhir-schema", "fhir-packages"):
        if (REPO / ".cache" / name).is_dir():
            shutil.copytree(REPO / ".cache" / name, dest / ".cache" / name, symlinks=True)


def run_group(name: str, spec: dict[str, list[str]], mutmut: Path, max_children: int) -> dict:
    """Mutate the group's modules (or only its `only` functions) in a scratch copy and collect the verdicts."""
    with tempfile.TemporaryDirectory(prefix=f"mutmut-{name}-") as tmp:
        work = Path(tmp) / "repo"
        work.mkdir()
        copy_repo(work)
        shared = REPO.parent / "shared"
        if shared.is_dir() and not (Path(tmp) / "shared").exists():
            (Path(tmp) / "shared").symlink_to(shared)  # tests find ../shared as in the repository
        # the whole package is copied into mutants/ (a partial copy would shadow the installed one), only the group's
        # modules are mutated; mappings, fixtures and the fetched schema travel with it
        (work / "setup.cfg").write_text(
            "[mutmut]\nsource_paths=\n    fhirsynth\n"
            "only_mutate=\n" + "".join(f"    {p}\n" for p in spec["mutate"]) +
            "pytest_add_cli_args_test_selection=\n" + "".join(f"    {t}\n" for t in spec["tests"]) +
            "also_copy=\n    mappings/\n    fixtures/\n    .cache/\n")
        pyproject = work / "pyproject.toml"  # mutmut reads [tool.mutmut] there first: keep it out of the way
        pyproject.write_text(pyproject.read_text().replace("[tool.mutmut]", "[tool.mutmut-disabled]"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FHIRSYNTH_PROGRESS": "0"}
        started = time.perf_counter()
        run = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *spec.get("only", [])],
                             cwd=work, env=env, capture_output=True, text=True)
        tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
        return collect(name, spec, work, mutmut, time.perf_counter() - started, tail)


def collect(name: str, spec: dict[str, list[str]], work: Path, mutmut: Path, seconds: float,
            tail: list[str]) -> dict:
    """mutmut's verdict on every mutant of a finished run in `work`, and the diff of each survivor."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True)
    lines = [ln.strip() for ln in results.stdout.splitlines() if ": " in ln]
    if spec.get("only"):  # mutants outside the patterns were never run ("not checked"): not part of this score
        lines = [ln for ln in lines if any(fnmatch.fnmatch(ln.rsplit(": ", 1)[0], p) for p in spec["only"])]
    survivors = [ln.rsplit(": ", 1)[0] for ln in lines if ln.endswith(": survived")]
    killed = sum(ln.endswith(": killed") for ln in lines)
    diffs = []
    for mutant in survivors:
        show = subprocess.run([str(mutmut), "show", mutant], cwd=work, env=env, capture_output=True, text=True)
        diffs.append((mutant, show.stdout.strip()))
    other = [ln for ln in lines if not ln.endswith((": killed", ": survived"))]
    return {"name": name, "spec": spec, "killed": killed, "survived": len(survivors), "other": other,
            "diffs": diffs, "seconds": seconds, "tail": tail}


def sql_case_only(diff: str) -> bool:
    """A mutant that only changes the letter case of an SQL text (a string with a `?` placeholder): SQLite reads
    keywords and column names case-insensitively, so no test can tell it apart (an equivalent mutant)."""
    removed = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return (len(removed) == len(added) == 1 and removed[0] != added[0] and "?" in removed[0]
            and removed[0].lower() == added[0].lower())


def _function(mutant: str) -> str:
    return mutant.split("__mutmut_")[0].replace("xǁ", "").replace("ǁ", ".").replace(".x_", ".")


def report_markdown(results: list[dict]) -> str:
    out = ["# Mutation testing (`scripts/mutation_test.py`, mutmut)", "",
           "Score = killed / (killed + survived), as mutmut reports them; `other` counts mutants no selected test "
           "covers and timeouts. Survivors are listed per function with their diffs; each one still needs a test "
           "or a written reason (see the note under each group).", "",
           "| group | modules | killed | survived | other | score | SQL-case survivors | score without them | minutes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        total = r["killed"] + r["survived"]
        score = f"{r['killed'] / total:.1%}" if total else "n/a"
        case = sum(sql_case_only(d) for _, d in r["diffs"])
        rest = f"{r['killed'] / (total - case):.1%}" if total - case else "n/a"
        out.append(f"| {r['name']} | {', '.join(r['spec']['mutate'])} | {r['killed']} | {r['survived']} | "
                   f"{len(r['other'])} | {score} | {case} | {rest} | {r['seconds'] / 60:.1f} |")
    for r in results:
        per_function: dict[str, int] = {}
        for mutant, _ in r["diffs"]:
            per_function[_function(mutant)] = per_function.get(_function(mutant), 0) + 1
        only = f" Only the mutants matching {', '.join(f'`{p}`' for p in r['spec']['only'])}." \
            if r["spec"].get("only") else ""
        out += ["", f"## {r['name']}", "", f"Tests: {', '.join(r['spec']['tests'])}.{only}", "",
                "| function | surviving mutants |", "|---|---|"]
        out += [f"| `{f}` | {n} |" for f, n in sorted(per_function.items(), key=lambda kv: -kv[1])]
        if r["other"]:
            out += ["", "Not killed or survived: " + ", ".join(f"`{o}`" for o in r["other"])]
        out += ["", "<details><summary>every surviving mutant's diff</summary>", ""]
        for mutant, diff in r["diffs"]:
            tag = " (SQL case only: equivalent)" if sql_case_only(diff) else ""
            out += [f"**{mutant}**{tag}", "", "```diff", diff, "```", ""]
        out += ["</details>"]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", choices=list(GROUPS), default=list(GROUPS))
    ap.add_argument("--report", type=Path, default=REPO / "MUTATION.md")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--only", action="append", metavar="PATTERN",
                    help="mutate and count only mutants whose name matches (fnmatch; repeatable), in every group")
    ap.add_argument("--collect-only", type=Path, metavar="WORK_DIR",
                    help="report a finished mutmut run in WORK_DIR (one group) instead of running one")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    mutmut = ensure_mutmut()
    if args.only:
        for name in args.groups:
            GROUPS[name] = {**GROUPS[name], "only": args.only}
    if args.collect_only:
        name = args.groups[0]
        args.report.write_text(report_markdown([collect(name, GROUPS[name], args.collect_only, mutmut, 0.0, [])]))
        return
    results = []
    for name in args.groups:
        log.info("group %s: mutating %s", name, GROUPS[name]["mutate"])
        results.append(run_group(name, GROUPS[name], mutmut, args.max_children))
        r = results[-1]
        log.info("group %s: killed %d, survived %d, other %d in %.1f min", name, r["killed"], r["survived"],
                 len(r["other"]), r["seconds"] / 60)
    args.report.write_text(report_markdown(results))
    log.info("report written to %s", args.report)


if __name__ == "__main__":
    main()
