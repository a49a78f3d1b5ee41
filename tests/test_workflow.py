"""The workflow as Snakemake sees it: dry runs, lint, formatting and GPU resources.

Also home of the helpers that test_s3.py and test_slurm.py use to run the real workflow in a
fresh working directory (its own config/ folder and .snakemake/, the repository's Snakefile),
so that tests never touch the repository's results/ or its Snakemake lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
TEST_CONFIG = "config/test.yaml"
# Stages in order, each with the rule that marks it and the targets that build it. Tests build the
# workflow up to the furthest stage that exists (load and evaluate need a database and more time;
# they have their own tests). Targets are rules or files, never `--until`: it cannot see past the
# stencil checkpoint.
STAGES = ("stencil", "sample", "train", "embed")
STAGE_RULE = {"stencil": "stencil", "sample": "sample_triplets", "train": "train_model", "embed": "rollup"}
GPU_RULES = ("train_model", "embed_region")


def make_workdir(path: Path, overlays: dict[str, dict[str, Any]] | None = None) -> Path:
    """A Snakemake working directory: copies of config/*.yaml plus overlay files config/<name>.yaml."""
    (path / "config").mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "config").glob("*.yaml"):
        shutil.copy(f, path / "config" / f.name)
    for name, content in (overlays or {}).items():
        (path / "config" / f"{name}.yaml").write_text(yaml.safe_dump(content))
    return path


def configfiles(*overlays: str) -> list[str]:
    """`--configfile` arguments: the tiny test config, then the named overlays."""
    return ["--configfile", TEST_CONFIG, *(f"config/{name}.yaml" for name in overlays)]


def run_snakemake(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run this repository's workflow in ``workdir``; stdout and stderr together in ``.stdout``."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), *args]
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-8000:]}")
    return proc


def job_stats(output: str) -> Counter[str]:
    """The 'Job stats' table of a (dry) run: rule -> job count (without the total)."""
    counts: Counter[str] = Counter()
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3 :]:
                parts = row.split()
                if len(parts) != 2 or parts[0] == "total":
                    break
                counts[parts[0]] += int(parts[1])
            break
    return counts


def finished_jobs(output: str) -> Counter[str]:
    """Rule -> number of jobs a real run finished (per-region jobs after a checkpoint included)."""
    return Counter(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", output, flags=re.MULTILINE))


JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")


def planned_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a (dry) run prints, in order."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        m = JOB_HEADER.match(line.strip())
        if m:
            jobs.append((m.group(1), {}))
        elif jobs and line.strip().startswith("wildcards:"):
            for item in line.strip()[len("wildcards:") :].split(","):
                key, _, value = item.strip().partition("=")
                jobs[-1][1][key] = value
        elif jobs and line.strip().startswith("resources:"):
            jobs[-1][1]["__resources__"] = line.strip()[len("resources:") :].strip()
    return jobs


def workflow_rules(workdir: Path) -> list[str]:
    out = run_snakemake(workdir, *configfiles(), "--list-rules").stdout
    return [line.strip() for line in out.splitlines() if re.fullmatch(r"\s*\w+\s*", line)]


def furthest_stage(workdir: Path) -> str:
    """The last of STAGES whose rule exists in the workflow right now."""
    rules = set(workflow_rules(workdir))
    present = [stage for stage in STAGES if STAGE_RULE[stage] in rules]
    assert present, f"none of {sorted(STAGE_RULE.values())} in the workflow's rules {sorted(rules)}"
    return present[-1]


def stage_targets(workdir: Path, stage: str) -> list[str]:
    """Snakemake targets that build the workflow up to and including ``stage``."""
    if stage == "sample":
        config = yaml.safe_load((workdir / TEST_CONFIG).read_text())
        return [f"results/samples/shard-{i}.npz" for i in range(config["sample"]["shards"])]
    return [STAGE_RULE[stage]]


def reached(stage: str, furthest: str) -> bool:
    """Whether a run up to ``furthest`` includes ``stage``."""
    return STAGES.index(stage) <= STAGES.index(furthest)


# --- tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workdir(
        tmp_path_factory.mktemp("workflow"), {"cuda": {"train": {"device": "cuda"}, "embed": {"device": "cuda"}}}
    )


def test_dry_run_lists_every_stage(workdir: Path) -> None:
    furthest = furthest_stage(workdir)
    out = run_snakemake(workdir, *configfiles(), "-n").stdout
    counts = job_stats(out)
    assert counts["prepare_layer"] == 3, out  # landcover, elevation, land_mask
    layers = {w["layer"] for rule, w in planned_jobs(out) if rule == "prepare_layer"}
    assert layers == {"landcover", "elevation", "land_mask"}
    assert counts["stencil"] == 1
    test_config = yaml.safe_load((workdir / TEST_CONFIG).read_text())
    if reached("sample", furthest):
        assert counts["sample_triplets"] == test_config["sample"]["shards"]
    if reached("train", furthest):
        assert counts["train_model"] == 1
    # a dry run cannot see past the stencil checkpoint: per-region jobs appear once it ran
    assert "embed_region" not in counts


def test_lint_is_clean(workdir: Path) -> None:
    proc = run_snakemake(workdir, *configfiles(), "--lint", check=False)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout


def test_every_rule_has_a_conda_env_and_a_log(workdir: Path) -> None:
    """What --lint checks per rule, asserted directly (names the rules at fault).

    (Snakemake 9.27 ignores `--lint json` on the command line, so the text output is parsed.)
    """
    out = run_snakemake(workdir, *configfiles(), "--lint", check=False).stdout
    missing: dict[str, list[str]] = {}
    rule = None
    for line in out.splitlines():
        m = re.match(r"^Lints for (?:rule (\w+)|snakefile .*):?", line.strip())
        if m:
            rule = m.group(1)
        elif rule and re.match(r"^\* (No log directive|.*conda environment)", line.strip()):
            missing.setdefault(rule, []).append(line.strip())
    assert not missing, missing


def test_snakefmt_is_clean() -> None:
    snakefmt = BIN / "snakefmt"
    proc = subprocess.run([str(snakefmt), "--check", "--compact-diff", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_rules_declare_gpu_when_cuda_is_configured(workdir: Path) -> None:
    """With train.device and embed.device cuda, train/embed jobs ask for gpu=1 (and only they do)."""
    furthest = furthest_stage(workdir)
    if not reached("train", furthest):
        pytest.skip(f"no GPU rule in the workflow yet (furthest stage: {furthest})")
    # per-region jobs only show in a dry run once the stencil checkpoint has run (a few seconds)
    run_snakemake(workdir, *configfiles("cuda"), "--cores", "2", "stencil")
    targets = stage_targets(workdir, furthest)
    out = run_snakemake(workdir, *targets, *configfiles("cuda"), "-n", "--resources", "gpu=1").stdout
    jobs = planned_jobs(out)
    rules = Counter(rule for rule, _ in jobs)
    assert rules["train_model"] == 1, out[-4000:]
    if reached("embed", furthest):
        manifest = json.loads((workdir / "results" / "stencil" / "manifest.json").read_text())
        assert rules["embed_region"] == len(manifest["regions"]) >= 2
    for rule, w in jobs:
        asks_gpu = re.search(r"\bgpu=1\b", w.get("__resources__", "")) is not None
        assert asks_gpu == (rule in GPU_RULES), (rule, w.get("__resources__"))


def test_without_cuda_no_job_asks_for_a_gpu(workdir: Path) -> None:
    if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        pytest.skip("this machine has an NVIDIA GPU, so device: auto means CUDA")
    furthest = furthest_stage(workdir)
    out = run_snakemake(workdir, *configfiles(), "-n", *stage_targets(workdir, furthest)).stdout
    assert planned_jobs(out), out[-3000:]
    for rule, w in planned_jobs(out):
        assert not re.search(r"\bgpu=[1-9]", w.get("__resources__", "")), (rule, w)
