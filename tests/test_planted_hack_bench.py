"""benchmarks/planted_hack.py at toy size: the monitor's evaluations are tabulated and the verdict is stated."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_planted_hack_benchmark_reports_the_monitors_evaluations(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import planted_hack

    out = tmp_path / "hack.md"
    assert planted_hack.main(["--method", "flow_grpo", "--steps", "2", "--every", "1", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows][:1] == ["0"]  # the baseline evaluation comes first
    assert "Result: " in text
