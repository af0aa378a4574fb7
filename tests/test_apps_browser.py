"""One real browser: headless Chromium clicks a vote and sees the leaderboard change; a screenshot is saved."""

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from apps.arena import ArenaConfig, LeaderboardConfig, serve  # noqa: E402
from apps.contenders import ContenderConfig  # noqa: E402
from apps.serve import ServerConfig  # noqa: E402
from test_apps_support import MODELS, free_port, make_gallery, running  # noqa: E402

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
        posts = []  # what the click sends: one plain POST (no queue join, no event stream)
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        vote_a.click()
        expect(page.get_by_text("you voted A")).to_be_visible(timeout=30_000)
        expect(vote_a).to_be_enabled()  # the next pair came back with the reveal
        assert len(posts) == 1 and "/gradio_api/run/" in posts[0], posts
        assert arena.store.read("SELECT COUNT(*) AS n FROM battles")[0]["n"] == 2
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


def test_media_are_shown_at_a_readable_size_and_keys_vote(tmp_path, chromium):
    """The 16×16 gallery images fill at least 256 CSS pixels each, pixelated (never smoothed), under the prompt;
    the keyboard votes and starts the next round; labels are plain text (no emoji font needed)."""
    from playwright.sync_api import expect, sync_playwright

    gallery = make_gallery(tmp_path / "gallery")
    cfg = ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                      db=tmp_path / "votes.sqlite", server=ServerConfig(open_mode=True, port=free_port()),
                      leaderboard=LeaderboardConfig(bootstrap_rounds=20, min_battles=1), seed=0)
    demo, arena = serve(cfg, block=False)
    shot = tmp_path / "arena-media.png"
    with running(demo) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        vote_b = page.get_by_role("button", name="B is better", exact=True)
        expect(vote_b).to_be_enabled(timeout=30_000)
        media = page.locator(".diffalign-media img")
        expect(media).to_have_count(2, timeout=30_000)
        page.wait_for_function("() => [...document.querySelectorAll('.diffalign-media img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        # the size the picture is drawn at inside its box (object-fit decides how the box is filled)
        sizes = media.evaluate_all(
            "els => els.map(e => { const r = e.getBoundingClientRect(); const st = getComputedStyle(e);"
            " let s = Math.min(r.width / e.naturalWidth, r.height / e.naturalHeight);"
            " if (st.objectFit === 'scale-down') s = Math.min(s, 1);"
            " if (st.objectFit === 'none') s = 1;"
            " const w = st.objectFit === 'fill' ? r.width : e.naturalWidth * s;"
            " const h = st.objectFit === 'fill' ? r.height : e.naturalHeight * s;"
            " return [w, h, e.naturalWidth, st.imageRendering, r.top]; })")
        assert len(sizes) == 2
        for width, height, natural, rendering, _top in sizes:
            assert width >= 256 and height >= 256, sizes
            assert natural >= 256 and rendering == "pixelated", sizes  # enlarged on the server, drawn sharp
        prompt_box = page.locator("#arena-prompt").bounding_box()
        assert prompt_box["y"] + prompt_box["height"] <= min(s[4] for s in sizes) + 1  # the prompt is above
        labels = [page.locator(f"#vote-{s}").inner_text().strip() for s in ("left", "right", "tie", "bothbad")]
        assert labels == ["A is better", "B is better", "Tie", "Both are bad"]
        assert all(ch.isascii() for label in labels for ch in label)
        page.keyboard.press("b")
        expect(page.get_by_text("you voted B")).to_be_visible(timeout=30_000)
        expect(vote_b).to_be_enabled()  # the vote brought the next pair
        assert arena.store.count_votes() == 1
        assert arena.store.read("SELECT side FROM votes")[0]["side"] == "right"
        issued = lambda: arena.store.read("SELECT COUNT(*) AS n FROM battles")[0]["n"]  # noqa: E731
        assert issued() == 2
        page.keyboard.press("n")  # skip this pair: a fresh one, no vote
        expect(page.get_by_text("you voted B")).to_have_count(0, timeout=30_000)  # the skip cleared the line
        assert issued() == 3 and arena.store.count_votes() == 1
        page.keyboard.press("t")
        expect(page.get_by_text("you voted a tie")).to_be_visible(timeout=30_000)
        assert [r["side"] for r in arena.store.read("SELECT side FROM votes ORDER BY created_at")] == ["right", "tie"]
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000 and not errors
