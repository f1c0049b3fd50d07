"""scripts/gpu_check.sh, the one command of a GPU session, dry-run here: every GPU stage skips with its reason."""
import re
import subprocess

import pytest
import torch

from conftest import ROOT

STAGES = ("build", "compare", "gpu_tests", "bench_ops", "auto_table", "bench_train", "bench_generate", "bench_hf",
          "cuda_kernels", "cpu_isa")


@pytest.mark.slow
def test_dry_run_without_a_gpu_skips_every_stage_and_still_writes_the_summary(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the dry run is for machines without one")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not a function" not in done.stderr and "command not found" not in done.stderr, done.stderr
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert summary.startswith("# gptfast GPU check")
    for stage in STAGES:           # in the documented order, each with its reason
        assert f"- **{stage}**: skipped: no CUDA GPU here (torch.cuda.is_available() is False)" in summary, stage
    assert [line.split("**")[1] for line in summary.splitlines() if line.startswith("- **")] == list(STAGES)
    assert "torch " + torch.__version__ in (tmp_path / "environment.txt").read_text()


def test_an_unknown_stage_is_refused(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path), "bench_opps"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown stage bench_opps" in done.stdout


def test_every_stage_runs_a_function_defined_once():
    """Each stage's command is python or a shell function defined exactly once and exported to the stage's
    child shell (a rename once left `gpu_tests` undefined and `tests` defined twice; the dry run skips
    every stage, so only this reads what a GPU run would call)."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    defined = re.findall(r"^([a-z_]+)\(\) \{", text, flags=re.M)
    assert len(defined) == len(set(defined)), defined
    exported = re.search(r"^export -f (.+)$", text, flags=re.M).group(1).split()
    assert set(exported) <= set(defined), set(exported) - set(defined)
    for stage in (*STAGES, "tests"):
        command = re.search(rf"^\s+{stage}\) run {stage} \d+ (\S+)", text, flags=re.M).group(1)
        assert command == "python" or command in exported, (stage, command)


def test_every_test_file_it_names_exists():
    """A renamed test file must not leave the GPU run pointing at nothing (pytest would stop the stage)."""
    import re
    named = set(re.findall(r"tests/[\w/]+\.py", (ROOT / "scripts" / "gpu_check.sh").read_text()))
    assert named and all((ROOT / path).is_file() for path in named), sorted(p for p in named if not (ROOT / p).is_file())
