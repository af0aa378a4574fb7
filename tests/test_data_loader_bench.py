"""benchmarks/data_loader.py at toy size: the loader benchmark runs and reports its rate and the goal."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loader_benchmark_reports_rates_and_the_goal(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import data_loader

    out = tmp_path / "loader.md"
    assert data_loader.main(["--pairs", "6", "--side", "64", "--resolution", "32", "--batches", "2",
                             "--workers", "0", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| in the training process |" in text and "| 1 DataLoader workers |" in text
    assert "Goal ≥ 3× the step's demand" in text
