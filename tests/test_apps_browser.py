"""One real browser: headless Chromium clicks a vote and sees the leaderboard change; a screenshot is saved."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from apps.arena import ArenaConfig, LeaderboardConfig, serve  # noqa: E402
from apps.contenders import ContenderConfig  # noqa: E402
from apps.serve import ServerConfig  # noqa: E402
from test_apps_support import MODELS, free_port, make_gallery, running  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def chromium():
    """Debian's chromium. The README's test command (`bash .ci/run`) installs it; a run without it fails here with
    the fix rather than skipping, so a missing browser can never hide a broken arena page."""
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run `bash .ci/run` (it installs it as root) or "
                    "`apt-get update && apt-get install -y chromium`")
    return path


def test_click_vote_and_leaderboard_updates(tmp_path, chromium):
    from playwright.sync_api import expect, sync_playwright

    gallery = make_gallery(tmp_path / "gallery")
    cfg = ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                      db=tmp_path / "votes.sqlite", server=ServerConfig(open_mode=True, port=free_port()),
                      leaderboard=LeaderboardConfig(bootstrap_rounds=20, min_battles=1), seed=0)
    demo, arena = serve(cfg, block=False)
    shot = Path(os.environ.get("ARENA_SCREENSHOT", tmp_path / "arena.png"))
    with running(demo) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        vote_a = page.get_by_role("button", name="A is better")
        expect(vote_a).to_be_enabled(timeout=30_000)  # the page load issued a battle
        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.get_by_text("0 rated votes")).to_be_visible(timeout=30_000)
        page.get_by_role("tab", name="Arena").click()
        vote_a.click()
        expect(page.get_by_text("you voted A")).to_be_visible(timeout=30_000)
        expect(vote_a).to_be_disabled()
        battle = arena.store.read("SELECT b.model_a, b.model_b, b.left_is_a FROM battles b JOIN votes v "
                                  "ON v.battle_id = b.battle_id")[0]
        winner = battle["model_a"] if battle["left_is_a"] else battle["model_b"]
        page.get_by_role("tab", name="Leaderboard").click()
        page.get_by_role("button", name="Refresh").click()
        expect(page.get_by_text("1 rated votes")).to_be_visible(timeout=30_000)
        expect(page.locator("table.winrate")).to_be_visible()
        first_row = page.get_by_role("row").nth(1)
        expect(first_row).to_contain_text(winner, timeout=30_000)
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    assert arena.store.count_votes() == 1
