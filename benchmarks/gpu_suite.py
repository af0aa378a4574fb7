"""One command for every GPU figure: the GPU-only tests, a real-size Diffusion-DPO step, reward throughput,
real-size denoiser forwards with and without the attention dispatcher, and the per-shape kernel table.

Built to fit one short GPU lease (≤ 8 minutes on one H200): each section runs in its own process with a time
limit taken from what is left of ``--budget``, its output is kept whatever happens to the others, and the
markdown report is rewritten after every section, so a run cut short still returns everything it finished.

    python benchmarks/gpu_suite.py --out results_dir            # on a CUDA machine
    python benchmarks/gpu_suite.py --dry --out results_dir      # tiny shapes on CPU: what the tests run

Writes ``gpu_suite.md`` (the tables, the command and the machine) and ``gpu_suite.log`` (every section's
output) into ``--out``, with the sections' own files beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Section:
    name: str
    argv: list[str]
    limit_s: float
    render: object  # callable(out_dir, completed process) -> markdown


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _render_tests(out: Path, proc) -> str:
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-12:]
    return "```\n" + "\n".join(tail) + "\n```"


def _render_json_table(module: str, file: str):
    def render(out: Path, proc) -> str:
        import importlib

        data = json.loads((out / file).read_text())
        return importlib.import_module(f"benchmarks.{module}").table(data)
    return render


def _render_markdown(file: str):
    def render(out: Path, proc) -> str:
        text = (out / file).read_text()
        return "\n".join(line for line in text.splitlines() if not line.startswith("# "))
    return render


def sections(out: Path, dry: bool) -> list[Section]:
    bench = ROOT / "benchmarks"
    s = []
    if not dry:  # the tests that skip without a GPU (on CPU the default test run covers the rest)
        s.append(Section("GPU-only tests", _python("-m", "pytest", "-rs", "-p", "no:cacheprovider",
                                                   "tests/test_attention_dispatch.py", "tests/test_attention_install.py",
                                                   "tests/test_attention_autotune.py"), 100, _render_tests))
    s.append(Section(
        "Denoiser forwards: diffusers' processors vs diffalign.attention.install",
        _python(str(bench / "gpu_denoisers.py"), "--json", str(out / "denoisers.json"),
                *(["--dry"] if dry else [])), 170, _render_json_table("gpu_denoisers", "denoisers.json")))
    s.append(Section(
        "Diffusion-DPO LoRA step at SD1.5 size (and SDXL memory)",
        _python(str(bench / "gpu_dpo.py"), "--json", str(out / "dpo.json"), *(["--dry", "--no-sdxl"] if dry else [])),
        170, _render_json_table("gpu_dpo", "dpo.json")))
    score = ["--arch", "ViT-H-14", "--device", "cuda", "--dtype", "fp16", "--batch-size", "32", "--images", "128",
             "--loop-images", "3", "--repeats", "2", "--threads", str(os.cpu_count() or 1)]
    if dry:
        score = ["--arch", "ViT-B-32", "--batch-size", "2", "--images", "2", "--loop-images", "1", "--repeats", "1",
                 "--image-size", "64", "--threads", "1"]
    s.append(Section("Reward throughput (HPS-style scorer)",
                     _python(str(bench / "score_throughput.py"), *score, "--out", str(out / "score.md")), 150,
                     _render_markdown("score.md")))
    kernels = ["--reps", "20", "--overhead-reps", "100", "--e2e-reps", "10"]
    if dry:
        kernels = ["--reps", "2", "--overhead-reps", "4", "--e2e-reps", "2", "--cpu-flop", "1e7", "--warmup", "1"]
    s.append(Section("Attention kernels per shape", _python(str(bench / "attention.py"), *kernels, "--out",
                                                            str(out / "attention.md")), 150,
                     _render_markdown("attention.md")))
    s.append(Section("Profiles: where the gaps come from",
                     _python(str(bench / "gpu_profile.py"), "--out", str(out / "profile.md"),
                             *(["--dry", "--parts", "unet,dpo"] if dry else [])), 120,
                     _render_markdown("profile.md")))
    return s


def machine() -> str:
    import torch

    text = f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        text += (f", {p.name} ({p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs), CUDA "
                 f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    try:
        import diffusers

        text += f", diffusers {diffusers.__version__}"
    except ImportError:
        pass
    return text


def run(out: Path, dry: bool, budget_s: float, only: list[str] | None = None) -> list[tuple[str, str, str]]:
    """Run the sections in order within ``budget_s``; returns (name, status, markdown) per section."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_suite.log"
    log.write_text("")
    start = time.monotonic()
    done: list[tuple[str, str, str]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for sec in sections(out, dry):
        if only and not any(o.lower() in sec.name.lower() for o in only):
            continue
        left = budget_s - (time.monotonic() - start)
        limit = min(sec.limit_s, left)
        if limit < 20:
            done.append((sec.name, "not run: the time budget was spent", ""))
            write_report(out, done, dry, time.monotonic() - start)
            continue
        t0 = time.monotonic()
        try:
            proc = subprocess.run(sec.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"stopped at its {limit:.0f} s limit"
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            # the sections rewrite their own files as they go: what a stopped one finished is still shown
            proc = subprocess.CompletedProcess(sec.argv, -9, output, "")
        took = time.monotonic() - t0
        with log.open("a") as f:
            f.write(f"\n===== {sec.name} ({status}, {took:.0f} s)\n{output}\n")
        body = ""
        try:
            body = sec.render(out, proc)
        except (OSError, ValueError, KeyError, ImportError) as e:
            status += f"; no table ({type(e).__name__}: {e})"
        if not body:
            body = "```\n" + "\n".join(output.strip().splitlines()[-15:]) + "\n```"
        done.append((sec.name, f"{status}, {took:.0f} s", body))
        write_report(out, done, dry, time.monotonic() - start)
        print(f"[{time.monotonic() - start:5.0f} s] {sec.name}: {status}", flush=True)
    return done


def write_report(out: Path, done, dry: bool, elapsed: float) -> Path:
    cmd = "python benchmarks/gpu_suite.py" + (" --dry" if dry else "")
    parts = ["# GPU suite" + (" (dry run: tiny shapes on CPU, plumbing only)" if dry else ""), "",
             f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Wall time: {elapsed:.0f} s", ""]
    for name, status, body in done:
        parts += [f"## {name}", "", f"_{status}_", "", body, ""]
    path = out / "gpu_suite.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_suite")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on CPU, to check the suite itself")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    ap.add_argument("--only", nargs="*", help="run the sections whose names contain these words")
    args = ap.parse_args(argv)
    done = run(args.out, args.dry, args.budget, args.only)
    print((args.out / "gpu_suite.md").read_text())
    return 0 if all(status.startswith("ok") for _, status, _ in done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
