"""The annotation app on 127.0.0.1 via gradio_client: gold first, criteria, progress, agreement, uploads."""

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from apps.annotate import AnnotateConfig, ItemsConfig, serve  # noqa: E402
from apps.flagging import FlaggingConfig  # noqa: E402
from apps.serve import ServerConfig  # noqa: E402
from test_apps_support import PASSWORDS, db_snapshot, free_port, make_pairs, png, running, users  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotate")
    cfg = AnnotateConfig(items=ItemsConfig(pairs=make_pairs(root, 3)), gold=make_pairs(root, 2, gold=True,
                                                                                       name="gold.jsonl"),
                         db=root / "votes.sqlite", criteria=["overall", "fidelity"], annotators_per_item=2,
                         server=ServerConfig(users=users(), admins=["root"], port=free_port()),
                         flagging=FlaggingConfig(min_gold=2))
    demo, annotation = serve(cfg, block=False)
    with running(demo) as url:
        yield url, annotation, cfg, root


def _client(url, user):
    return Client(url, auth=(user, PASSWORDS[user]), verbose=False)


def _answer_all(client, store, *, correct=True, criteria=("overall", "fidelity")):
    """Work through every task; answer gold items right (or wrong), others 'A'."""
    done = 0
    while True:
        out = client.predict(api_name="/next_task")
        progress, prompt, left, right, task_id = out[:5]
        if not task_id:
            assert "All done" in prompt
            return done, progress
        assert os.path.getsize(left) > 0 and os.path.getsize(right) > 0
        battle = store.battle(task_id)
        gold = store.read("SELECT gold FROM items WHERE item_id = ?", (battle.item_id,))[0]["gold"]
        if gold is not None:
            a_side = "A" if battle.left_is_a else "B"
            b_side = "B" if battle.left_is_a else "A"
            choice = a_side if correct else b_side
        else:
            choice = "A"
        res = client.predict(task_id, {c: choice for c in criteria}, False, "", api_name="/submit")
        assert set(res["answers"]) == set(criteria)
        done += 1


def test_annotation_task_end_to_end(app):
    url, annotation, cfg, root = app
    store = annotation.store
    ann = _client(url, "ann")
    first = ann.predict(api_name="/next_task")
    assert store.battle(first[4]).item_id in {r["item_id"] for r in store.items() if r["gold"]}  # gold first
    again = ann.predict(api_name="/next_task")
    assert again[4] == first[4]  # a reload resumes the open task instead of issuing another
    from PIL import Image

    for shown in first[2:4]:  # the 16×16 pair is sent enlarged, pixel for pixel, to a size a person can judge
        with Image.open(shown) as im:
            assert min(im.size) >= 256 and len(im.getcolors()) == 1
    with pytest.raises(AppError, match="please answer: fidelity"):
        ann.predict(first[4], {"overall": "A"}, False, "", api_name="/submit")
    done, progress = _answer_all(ann, store)
    assert done == 5 and "5 of 5" in progress and "2/2 correct" in progress
    bob = _client(url, "bob")
    done_bob, progress_bob = _answer_all(bob, store, correct=False)
    assert done_bob == 5 and "0/2 correct" in progress_bob
    root_client = _client(url, "root")
    done_root, _ = _answer_all(root_client, store)
    assert done_root == 2  # only the gold items: every other item already has 2 annotations
    agreement, people = root_client.predict(api_name="/stats")
    rows = {r[0]: r for r in agreement["data"]}
    assert set(rows) == {"overall", "fidelity"} and rows["overall"][1] == 5
    assert {r[0] for r in people["data"]} == {"user:ann", "user:bob", "user:root"}
    assert _client(url, "bob").predict(api_name="/stats")[1]["data"] in ([], [[None] * 5], [["", "", "", "", ""]])
    flags = root_client.predict(api_name="/flag")
    assert "user:bob" in flags and "gold" in flags["user:bob"]["reasons"][0]


def test_uploads_bad_file_or_non_admin_leave_the_database_unchanged(app, tmp_path):
    url, annotation, cfg, root = app
    good_a, good_b = png(tmp_path / "a.png", (1, 2, 3)), png(tmp_path / "b.png", (4, 5, 6))
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    admin, ann = _client(url, "root"), _client(url, "ann")
    before = db_snapshot(cfg.db)
    with pytest.raises(AppError, match="not a recognised"):
        admin.predict("p", handle_file(str(good_a)), handle_file(str(fake)), "none", api_name="/add_pair")
    with pytest.raises(AppError, match="admins only"):
        ann.predict("p", handle_file(str(good_a)), handle_file(str(good_b)), "A", api_name="/add_pair")
    assert db_snapshot(cfg.db) == before
    item_id = admin.predict("new prompt", handle_file(str(good_a)), handle_file(str(good_b)), "A",
                            api_name="/add_pair")
    row = annotation.store.read("SELECT prompt, gold FROM items WHERE item_id = ?", (item_id,))[0]
    assert (row["prompt"], row["gold"]) == ("new prompt", "model_a")
