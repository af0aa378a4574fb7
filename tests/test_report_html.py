"""report.html: self-contained (nothing fetched), one section per reward, the numbers it shows are the report's,
written by ``diffalign eval`` beside eval.json, and renders in headless Chromium with every image decoded."""

import json
import re

import pytest
import torch

from diffalign.eval import compare, outcome_values
from diffalign.report_html import ReportSection, SplitResult, render_report_html, write_report_html



def _split(name: str, prompts, seeds=6, size=8, seed=0, shift=0.05) -> SplitResult:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(len(prompts), seeds, 3, size, size, generator=g)
    tuned = (base + 0.1 * torch.rand(base.shape, generator=g)).clamp(0, 1)
    sb = torch.rand(len(prompts), seeds, generator=g)
    st = sb + shift + 0.1 * torch.randn(len(prompts), seeds, generator=g)
    acc = (sb > 0.5).float(), (st > 0.5).float()
    rep = compare(name, prompts, base, tuned, sb, st, extra={"accuracy": acc})
    return SplitResult(rep, list(prompts), base, tuned, sb, st)


def _sections():
    return [ReportSection("shapes-oracle", [_split("held-out", ["a red <circle>", "a blue square"]),
                                            _split("train", ["a green triangle"], seed=1)]),
            ReportSection("clip-score", [_split("held-out", ["a red <circle>", "a blue square"], seed=2)])]


def test_page_is_self_contained_with_one_section_per_reward():
    page = render_report_html(_sections(), {"seeds": 6, "steps": 2}, per_prompt=4)
    assert len(re.findall(r"<section id='reward-\d'>", page)) == 2
    assert "Reward: shapes-oracle" in page and "Reward: clip-score" in page
    # nothing that could make a request: no URL scheme but data:, no script, a CSP that forbids the rest
    assert not re.search(r"(?:src|href)\s*=\s*['\"](?!data:|#)", page)
    assert "http" not in page.lower() or "http-equiv" in page.lower()
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "default-src 'none'" in page
    # 3 + 2 prompts with base and tuned rows of 4 images each: every image inline
    imgs = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(imgs) == (2 + 1 + 2) * 2 * 4
    assert "a red &lt;circle&gt;" in page and "<circle>" not in page  # prompts are escaped
    assert page.count("<svg") == 2 * 3  # a histogram and a win-rate chart per split


def test_numbers_shown_are_the_reports():
    sec = _sections()[:1]
    page = render_report_html(sec, per_prompt=2)
    rep = sec[0].splits[0].report
    assert f"{rep.reward_gain:+.4f}" in page and f"{rep.wins} wins / {rep.ties} ties / {rep.losses} losses" in page
    assert f"accuracy <b>{rep.extra['accuracy base']:.3f} → {rep.extra['accuracy tuned']:.3f}</b>" in page
    assert f"drift <b>{rep.drift:.4f}</b>" in page
    for r in rep.prompts:
        assert f"{r.reward_tuned - r.reward_base:+.3f}" in page
    # every tuned score is printed under its image, coloured by the tie band
    split = sec[0].splits[0]
    for i in range(len(split.prompts)):
        for j in range(2):
            t, b = float(split.tuned_scores[i, j]), float(split.base_scores[i, j])
            cls = "score win" if t - b >= rep.tie_band else "score loss" if t - b <= -rep.tie_band else "score"
            assert f"<div class='{cls}'>{t:.3f}</div>" in page


def test_an_exact_tie_is_not_coloured_a_win_even_with_a_zero_tie_band():
    split = _split("held-out", ["a red circle"], seeds=2, shift=0.0)
    split.tuned_scores[0, 0] = split.base_scores[0, 0]  # an exact tie
    split.report.tie_band = 0.0
    page = render_report_html([ReportSection("r", [split])], per_prompt=2)
    assert f"<div class='score'>{float(split.tuned_scores[0, 0]):.3f}</div>" in page


def test_outcome_values_average_to_the_win_rate():
    from diffalign.eval import win_rate

    t = torch.tensor([0.5, 0.3, 0.2, 0.9])
    b = torch.tensor([0.4, 0.305, 0.6, 0.9])
    assert outcome_values(t, b, 0.01).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert float(outcome_values(t, b, 0.01).mean()) == pytest.approx(win_rate(t, b, 0.01))


def test_tiny_images_are_enlarged_with_nearest_neighbour():
    import base64
    import io

    from PIL import Image

    from diffalign.report_html import image_data_uri

    img = torch.zeros(3, 4, 4)
    img[:, 0, 0] = 1.0  # one white pixel in the corner
    uri, w, h = image_data_uri(img, min_px=96)
    assert (w, h) == (96, 96)
    pil = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    colours = {c for _, c in pil.getcolors()}
    assert colours == {(255, 255, 255), (0, 0, 0)}  # no blended (blurred) pixel anywhere
    assert pil.getpixel((23, 23)) == (255, 255, 255) and pil.getpixel((24, 24)) == (0, 0, 0)


def test_video_is_shown_as_filmstrips_and_audio_without_preview():
    base = torch.rand(1, 2, 3, 3, 8, 8)  # [P, S, F, C, H, W]
    sb, st = torch.rand(1, 2), torch.rand(1, 2)
    rep = compare("held-out", ["p"], base, base, sb, st)
    page = render_report_html([ReportSection("r", [SplitResult(rep, ["p"], base, base, sb, st)])])
    widths = re.findall(r"<img src='data:[^']+' width='(\d+)' height='(\d+)'", page)
    assert len(widths) == 4 and all(int(w) == 3 * int(h) for w, h in widths)  # 3 frames side by side
    audio = torch.rand(1, 2, 1, 400)
    rep = compare("held-out", ["p"], audio, audio, sb, st)
    page = render_report_html([ReportSection("r", [SplitResult(rep, ["p"], audio, audio, sb, st)])])
    assert "<img" not in page and "No preview for this modality" in page


def test_diffalign_eval_writes_report_html_beside_eval_json(tmp_path):
    from tiny_models import tiny_toy_folder
    from trainers.evaluate import run_eval

    model = tiny_toy_folder(tmp_path / "toy")
    out = tmp_path / "eval"
    run_eval(base=str(model), lora=None, reward="shapes-oracle", checkpoint=None, prompts="toy-heldout", seeds=3,
             steps=2, guidance=1.0, out=out)
    assert (out / "eval.json").is_file() and (out / "grid.png").is_file()
    page = (out / "report.html").read_text(encoding="utf-8")
    held = json.loads((out / "eval.json").read_text())["splits"]["held-out"]
    assert "Reward: shapes-oracle" in page and f"{held['reward_gain']:+.4f}" in page
    assert len(re.findall(r"<img src='data:image/png;base64,", page)) == len(held["prompts"]) * 2 * 3


class _Brightness:
    def __init__(self, sign):
        self.sign = sign

    def score(self, images, prompts=None):
        return self.sign * images.float().flatten(1).mean(1)


class _TwoRewards:
    """A weighted list as the evaluation sees it: the sum scores, each member is reported on its own."""

    members = (("bright", _Brightness(1.0), 1.0), ("dark", _Brightness(-1.0), 0.5))

    def score(self, images, prompts=None):
        return sum(w * m.score(images, prompts) for _, m, w in self.members)

    def named_members(self):
        return list(self.members)


def test_several_rewards_get_one_section_each(tmp_path):
    from diffalign.generators.registry import load_generator
    from tiny_models import tiny_toy_folder
    from trainers.config import EvalConfig
    from trainers.evaluate import evaluate_generator

    gen = load_generator(str(tiny_toy_folder(tmp_path / "toy")))
    cfg = EvalConfig(prompts="toy-heldout", seeds=2, steps=2, guidance=1.0, reward="bright-and-dark", grid_seeds=2)
    evaluate_generator(gen, cfg, tmp_path / "eval", reward=_TwoRewards())
    page = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert re.findall(r"<h2>Reward: ([^<]+)</h2>", page) == ["bright-and-dark", "bright", "dark"]


def test_report_renders_in_chromium_without_errors(tmp_path, chromium):
    from playwright.sync_api import sync_playwright

    path = write_report_html(tmp_path, _sections(), {"seeds": 6}, per_prompt=4)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, "
                                                  "e.getBoundingClientRect().width])")
        svgs = page.eval_on_selector_all("svg", "els => els.map(e => e.getBoundingClientRect().width)")
        sections = page.locator("section h2").all_inner_texts()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert all(not u.startswith(("http:", "https:")) for u in requests), requests
    assert len(images) == 40 and all(ok and nat >= 96 and shown >= 96 for ok, nat, shown in images), images[:3]
    assert len(svgs) == 6 and all(w > 100 for w in svgs)
    assert sections == ["Reward: shapes-oracle", "Reward: clip-score"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
