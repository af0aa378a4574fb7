"""The GPU suite's --dry mode: every section it runs on a GPU also runs here at tiny widths on the CPU, so the
suite cannot rot between GPU leases (the numbers are meaningless; the plumbing and the tables are checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_suite_writes_every_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_suite

    done = gpu_suite.run(tmp_path, dry=True, budget_s=600, only=["denoiser", "dpo", "profiles"])
    assert [name for name, _, _ in done] == [
        "Denoiser forwards: diffusers' processors vs diffalign.attention.install",
        "Diffusion-DPO LoRA step at SD1.5 size (and SDXL memory)",
        "Profiles: where the gaps come from"], done
    for name, status, body in done:
        assert status.startswith("ok"), (name, status, (tmp_path / "gpu_suite.log").read_text()[-3000:])
    report = (tmp_path / "gpu_suite.md").read_text()
    assert "| SD1.5 UNet (860 M) (dry: tiny widths) |" in report  # one row per denoiser
    assert "| Wan2.1-1.3B, 81 frames 480p (dry: tiny widths) |" in report
    assert "time (a)/(c) = **" in report  # the DPO step's ratio against the bare loop
    assert "### DPO step, our loop" in report and "### DPO step, bare loop" in report


def test_a_section_past_the_budget_is_reported_not_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_suite

    done = gpu_suite.run(tmp_path, dry=True, budget_s=5, only=["denoiser"])
    assert done == [("Denoiser forwards: diffusers' processors vs diffalign.attention.install",
                     "not run: the time budget was spent", "")]
    assert "not run: the time budget was spent" in (tmp_path / "gpu_suite.md").read_text()


def test_a_section_stopped_at_its_limit_still_reports_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_suite

    slow = gpu_suite.Section(
        "slow part", [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(tmp_path / 'part.md')!r})"
                                            ".write_text('| first part | 1.0 |'); time.sleep(60)"],
        limit_s=21, render=gpu_suite._render_markdown("part.md"))
    monkeypatch.setattr(gpu_suite, "sections", lambda out, dry: [slow])
    [(name, status, body)] = gpu_suite.run(tmp_path, dry=True, budget_s=21)
    assert status.startswith("stopped at its 21 s limit") and "| first part | 1.0 |" in body
