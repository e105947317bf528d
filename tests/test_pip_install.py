"""A plain `pip install` carries everything the commands read at run time (the FHIR R4 schema, the mappings, the
demo sample, the benchmark results): build the wheel from a copy of the source, install it with --target, and run
`fhirsynth evaluate` on small outputs from a directory outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what the commands load from the package at run time (file name -> where it comes from)
PACKAGE_DATA = ["fhirsynth/data/fhir-r4.schema.json.xz", "fhirsynth/data/benchmark-records.json",
                "fhirsynth/data/mappings/us-core.toml", "fhirsynth/data/mappings/ips.toml",
                "fhirsynth/data/mappings/public-codes.toml", "fhirsynth/data/mappings/reference-ranges.toml",
                "fhirsynth/data/mappings/constraints.toml", "fhirsynth/data/sample/manifest.json",
                "fhirsynth/data/sample/Patient.ndjson.gz"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of what the build reads (the build must not write into the checkout),
    installed into a --target directory; returns that directory."""
    root = tmp_path_factory.mktemp("pip")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "fhirsynth", src / "fhirsynth", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "mappings", src / "mappings")
    shutil.copytree(REPO / "fixtures" / "sample", src / "fixtures" / "sample")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRSYNTH_") and k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(src)], cwd=root, env=env, timeout=300)
    (wheel,) = (root / "dist").glob("fhirsynth-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in PACKAGE_DATA if n not in names]
    assert not missing, f"not in the wheel: {missing}"
    target = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], cwd=root,
         env=env, timeout=300)
    return target


@pytest.mark.slow
def test_evaluate_works_from_a_plain_install(installed: Path, tmp_path: Path) -> None:
    from fhirsynth.evaluate.toy import toy_timelines
    from fhirsynth.export import writer
    from fhirsynth.timeline.assembler import GeneratorInfo
    from fhirsynth.timeline.io import write_timelines

    # small outputs: real timelines and an NDJSON export (ingested with the us-core mapping, FHIR-validated)
    write_timelines(toy_timelines(40, seed=1, visits_per_year=0.5, id_prefix="r"), tmp_path / "real")
    writer.write_export(toy_timelines(20, seed=2, visits_per_year=0.5, id_prefix="s"), tmp_path / "export",
                        generator=GeneratorInfo(model_hash="test", epsilon=None, delta=None))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # only the installed package: no source tree on the path, no override of the packaged data
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRSYNTH_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    probe = _run([sys.executable, "-c", "import fhirsynth; print(fhirsynth.__file__)"], cwd=outside, env=env,
                 timeout=60)
    assert Path(probe.stdout.strip()).is_relative_to(installed), probe.stdout
    _run([sys.executable, "-m", "fhirsynth", "evaluate", "--real", str(tmp_path / "real"), "--synthetic",
          str(tmp_path / "export"), "--out", str(tmp_path / "report"), "--validity-sample", "5", "--no-html"],
         cwd=outside, env=env, timeout=600)
    import json

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    validity = report["plausibility"]["fhir_validity_synthetic"]
    assert validity["valid_rate"] == 1.0, validity  # the schema was loaded and used, not skipped
    assert report["meta"]["synthetic"]["patients"] == 20
