"""Passwords, identities, rate limits, upload sniffing, path traversal, flagging and agreement statistics."""

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from apps.agreement import agreement_report, cohen_kappa, fleiss_kappa
from apps.auth import (VOTER_COOKIE, LoginGuard, LoginLocked, PasswordCheck, RateLimiter, SessionKeys, client_ip,
                       hash_password, judge_of, verify_password)
from apps.flagging import FlaggingConfig, flag_suspicious, suspicious_judges
from apps.rest import RestAuth
from apps.serve import ServerConfig
from apps.store import VoteStore
from apps.uploads import UploadRejected, check_media, read_upload, safe_child, sniff


def _png_bytes(colour=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_passwords_are_salted_hashes_checked_in_constant_time():
    h1, h2 = hash_password("s3cret", iterations=1000), hash_password("s3cret", iterations=1000)
    assert h1 != h2 and "s3cret" not in h1
    assert verify_password("s3cret", h1) and not verify_password("S3cret", h1)
    check = PasswordCheck({"ann": h1})
    assert check("ann", "s3cret") and check("ann", "s3cret") and not check("ann", "x") and not check("eve", "s3cret")
    with pytest.raises(ValueError, match="plain-text passwords are not accepted"):
        ServerConfig(users={"ann": "s3cret"})
    with pytest.raises(ValueError, match="nobody could vote"):
        ServerConfig(open_mode=False, users={})


def test_identity_comes_from_the_server_never_from_client_headers(tmp_path):
    keys = SessionKeys.beside(tmp_path / "v.sqlite")
    cookie = f"{VOTER_COOKIE}={keys.new_token('voter')}"
    req = SimpleNamespace(username=None, session_hash="abc", client=SimpleNamespace(host="10.0.0.1"),
                          headers={"x-forwarded-for": "1.2.3.4", "cookie": cookie})
    anon = judge_of(req, open_mode=True, keys=keys)
    assert anon.startswith("anon:") and "abc" not in anon
    spoofed = SimpleNamespace(**{**vars(req), "headers": {"x-forwarded-for": "9.9.9.9", "cookie": cookie}})
    assert judge_of(spoofed, open_mode=True, keys=keys) == anon  # forwarded headers ignored unless configured
    assert judge_of(spoofed, open_mode=True, keys=keys, trust_proxy_headers=True) != anon
    with pytest.raises(PermissionError, match="sign in"):
        judge_of(req, open_mode=False, keys=keys)
    assert judge_of(SimpleNamespace(**{**vars(req), "username": "ann"}), open_mode=False) == "user:ann"


def test_a_gradio_session_hash_is_never_an_identity(tmp_path):
    """Gradio lets a client pick its session hash: neither a copied hash nor "rest-" + a token's unsigned half
    may make the caller someone else."""
    keys = SessionKeys.beside(tmp_path / "v.sqlite")
    peer = SimpleNamespace(host="10.0.0.1")
    victim_cookie = f"{VOTER_COOKIE}={keys.new_token('voter')}"
    victim = SimpleNamespace(username=None, session_hash="victim-hash", client=peer, headers={"cookie": victim_cookie})
    thief = SimpleNamespace(username=None, session_hash="victim-hash", client=peer,
                            headers={"cookie": f"{VOTER_COOKIE}={keys.new_token('voter')}"})
    assert judge_of(thief, open_mode=True, keys=keys) != judge_of(victim, open_mode=True, keys=keys)
    for headers in ({}, {"cookie": f"{VOTER_COOKIE}=abc.def"}, {"cookie": victim_cookie + "0"}):
        with pytest.raises(PermissionError, match="voter cookie"):
            judge_of(SimpleNamespace(**{**vars(victim), "headers": headers}), open_mode=True, keys=keys)
    # a REST token is not a voter cookie, and the REST judge of a token is not reachable through a session hash
    rest = RestAuth(ServerConfig(open_mode=True), keys)
    token = rest.new_session()
    raw = token.split(".")[0]
    rest_judge, _ = rest.identify({}, peer, rest.session_of(token))
    with pytest.raises(PermissionError):
        judge_of(SimpleNamespace(username=None, session_hash="rest-" + raw, client=peer,
                                 headers={"cookie": f"{VOTER_COOKIE}={token}"}), open_mode=True, keys=keys)
    hijack = SimpleNamespace(username=None, session_hash="rest-" + raw, client=peer, headers={"cookie": victim_cookie})
    assert judge_of(hijack, open_mode=True, keys=keys) != rest_judge
    with pytest.raises(PermissionError, match="session"):
        rest.identify({}, peer, "rest-")


def test_proxy_headers_take_the_address_our_proxy_appended():
    req = SimpleNamespace(client=SimpleNamespace(host="10.0.0.9"),
                          headers={"x-forwarded-for": "6.6.6.6, 1.2.3.4", "cf-connecting-ip": "7.7.7.7"})
    assert client_ip(req) == "10.0.0.9"
    assert client_ip(req, trust_proxy_headers=True) == "1.2.3.4"  # the client wrote 6.6.6.6 itself


def test_signing_key_is_kept_beside_the_db_with_private_permissions(tmp_path):
    import os
    import stat

    db = tmp_path / "sub" / "votes.sqlite"
    keys = SessionKeys.load_or_create(str(db) + ".key")
    token = keys.new_token("rest")
    mode = stat.S_IMODE(os.stat(str(db) + ".key").st_mode)
    assert mode == 0o600, oct(mode)
    again = SessionKeys.load_or_create(str(db) + ".key")  # "after a restart": the same key, the token verifies
    assert again.verify(token, "rest") == token.split(".")[0] and again.verify(token, "voter") is None
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["votes.sqlite.key"]  # no temp file left
    os.chmod(str(db) + ".key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        SessionKeys.load_or_create(str(db) + ".key")
    os.chmod(str(db) + ".key", 0o600)
    (tmp_path / "sub" / "votes.sqlite.key").write_text("not hex")
    with pytest.raises(ValueError, match="not a signing key"):
        SessionKeys.load_or_create(str(db) + ".key")


def test_failed_sign_ins_back_off_then_lock_per_account_and_address():
    now = [0.0]
    guard = LoginGuard(free_failures=3, lock_after=10, lockout_s=900.0, clock=lambda: now[0])
    for _ in range(3):
        guard.check("ann", "1.1.1.1")
        guard.failed("ann", "1.1.1.1")
    guard.check("ann", "1.1.1.1")  # three free failures
    guard.failed("ann", "1.1.1.1")
    with pytest.raises(LoginLocked, match="wait") as exc:
        guard.check("ann", "2.2.2.2")  # the account is slowed down from any address
    assert exc.value.retry_after >= 1
    now[0] += 1.5
    guard.check("ann", "2.2.2.2")
    for _ in range(6):
        now[0] += 61.0
        guard.failed("ann", "1.1.1.1")
    with pytest.raises(LoginLocked, match="locked"):
        guard.check("ann", "3.3.3.3")  # ten failures: locked, whatever the password
    with pytest.raises(LoginLocked, match="address 1.1.1.1"):
        guard.check("bob", "1.1.1.1")  # and so is the guessing address, for every account
    guard.check("bob", "4.4.4.4")
    now[0] += 901.0
    guard.check("ann", "1.1.1.1")  # temporary
    guard.succeeded("ann", "1.1.1.1")


def test_rate_limiter_is_a_sliding_window_per_key():
    rl = RateLimiter(2, 10.0)
    assert rl.allow("a", 0.0) and rl.allow("a", 1.0) and not rl.allow("a", 2.0)
    assert rl.allow("b", 2.0)
    assert rl.allow("a", 10.5)


def test_uploads_are_checked_by_content_and_size(tmp_path):
    good = _png_bytes()
    assert check_media(good).ext == ".png"
    fake = tmp_path / "evil.png"
    fake.write_bytes(b"<script>alert(1)</script>")
    with pytest.raises(UploadRejected, match="not a recognised"):
        read_upload(fake)
    truncated = good[:40]
    with pytest.raises(UploadRejected, match="undecodable"):
        check_media(truncated)
    with pytest.raises(UploadRejected, match="over the 100-byte limit"):
        check_media(good + b"\0" * 200, max_bytes=100)
    with pytest.raises(UploadRejected, match="accepts image"):
        check_media(b"RIFF\x24\0\0\0WAVEfmt " + b"\0" * 40, allowed=("image",))
    assert sniff(b"glTF\x02\0\0\0") == ("3d", ".glb")
    assert sniff(b"\0\0\0\x18ftypisom") == ("video", ".mp4")
    assert sniff(b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n") == ("3d", ".obj")


def test_uploads_are_re_encoded_from_pixels_so_payloads_are_dropped():
    png = _png_bytes((9, 8, 7))
    payload = b"<html><script>alert(1)</script></html>PK\x03\x04zip-entry"
    media = check_media(png + payload)
    assert media.ext == ".png" and payload not in media.data and b"PK\x03\x04" not in media.data
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(media.data))), np.asarray(Image.open(io.BytesIO(png))))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue() + payload
    out = check_media(jpeg)
    assert out.ext == ".png" and out.data.startswith(b"\x89PNG") and payload not in out.data
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def test_pixel_count_is_checked_from_the_header_before_decoding(monkeypatch):
    from PIL import PngImagePlugin

    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 0).save(buf, format="PNG")  # 36 megapixels in a few tens of KB
    bomb = buf.getvalue()
    assert len(bomb) < 200_000

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(UploadRejected, match="6000×6000 = 36.0 megapixels, over the 10-megapixel limit"):
        check_media(bomb, max_pixels=10_000_000)


def _declared_png(width, height):
    """A tiny PNG whose header declares ``width``×``height`` (its pixel data could fill 1×1): a decompression bomb
    as far as any reader of the header can tell, without ever allocating one here."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1), 0).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_the_shared_image_decoder_refuses_bombs_from_the_header(monkeypatch):
    """``decode_image_bytes`` reads untrusted bytes for the preference readers too: the guard lives there, by
    default, and apps' ``clean_image`` is built on it."""
    from PIL import PngImagePlugin

    from diffalign.media import MAX_DECODE_PIXELS, MediaError, decode_image_bytes

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(MediaError, match="9000×9000 = 81.0 megapixels, over the 64-megapixel limit"):
        decode_image_bytes(_declared_png(9000, 9000))  # under PIL's own error threshold: only a warning there
    assert 9000 * 9000 > MAX_DECODE_PIXELS
    with pytest.raises(MediaError, match="over the 0.5-megapixel limit"):
        decode_image_bytes(_declared_png(1000, 1000), max_pixels=500_000)
    with pytest.raises(UploadRejected, match="avatar.png: image is 9000×9000"):
        check_media(_declared_png(9000, 9000), max_pixels=MAX_DECODE_PIXELS, what="avatar.png")


def test_sixteen_bit_greyscale_keeps_its_picture_instead_of_turning_white():
    from diffalign.media import decode_image_bytes

    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256 + 255).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # a 16-bit greyscale PNG
    stored = Image.open(io.BytesIO(check_media(buf.getvalue()).data))
    assert stored.mode == "L" and np.array_equal(np.asarray(stored), (ramp >> 8).astype(np.uint8))
    rgb = np.asarray(decode_image_bytes(buf.getvalue()))
    assert rgb.shape == (16, 16, 3) and np.array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))


def test_no_path_traversal(tmp_path):
    (tmp_path / "root").mkdir()
    assert safe_child(tmp_path / "root", "a/b.png") == (tmp_path / "root" / "a" / "b.png").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(UploadRejected, match="escapes"):
            safe_child(tmp_path / "root", bad)


def _vote(store, judge, side, item_gold=None, latency=5000.0, i=0):
    a = store.put_media(f"a{i}".encode(), ".png", "image")
    b = store.put_media(f"b{i}".encode(), ".png", "image")
    item = store.add_item(prompt=f"p{i}", model_a="x", model_b="y", media_a=a, media_b=b, gold=item_gold)
    bt = store.issue_battle(prompt=f"p{i}", model_a="x", model_b="y", media_a=a, media_b=b, left_is_a=True,
                            issued_to=judge, session_hash=None, mode="task", item_id=item)
    store.record_vote(bt.battle_id, judge, side, latency_ms=latency)


def test_flagging_same_side_fast_and_gold_failures(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    for i in range(12):
        _vote(store, "lefty", "left", i=i)
        _vote(store, "fast", ("left", "right")[i % 2], latency=200.0, i=i)
        _vote(store, "honest", ("left", "right")[i % 2], i=i)
    for i in range(4):
        _vote(store, "wrong", "right", item_gold="model_a", i=100 + i)
        _vote(store, "honest", "left", item_gold="model_a", i=100 + i)
    found = suspicious_judges(store, FlaggingConfig(min_votes=10))
    assert set(found) == {"lefty", "fast", "wrong"}
    assert "same side" in found["lefty"][0] and "too fast" in found["fast"][0] and "gold" in found["wrong"][0]
    flag_suspicious(store, FlaggingConfig(min_votes=10))
    assert set(store.flags()) == {"lefty", "fast", "wrong"}
    kept = {r["judge"] for r in store.vote_rows(exclude_flagged=True)}
    assert kept == {"honest"}
    assert len(list(store.vote_rows())) == 12 * 3 + 8  # nothing deleted


def test_kappas_match_references():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    a = rng.choice(["model_a", "model_b", "tie"], 200).tolist()
    b = [x if rng.random() < 0.7 else "tie" for x in a]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    # Fleiss (1971) worked example as given on Wikipedia: κ = 0.210
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[1, 1], [2, 1]]))


def test_agreement_report_uses_stored_order(tmp_path):
    rows = []
    for item in range(4):
        for judge in ("j1", "j2", "j3"):
            ans = "model_a" if item % 2 == 0 else "model_b"
            rows.append({"item_id": f"i{item}", "judge": judge, "winner": ans,
                         "answers": json.dumps({"overall": ans, "fidelity": "tie" if judge == "j3" else ans})})
    report = {r["criterion"]: r for r in agreement_report(rows, ["overall", "fidelity"])}
    assert report["overall"]["fleiss"] == pytest.approx(1.0) and report["overall"]["cohen_mean"] == pytest.approx(1)
    assert report["fidelity"]["fleiss"] < 0.5 and report["fidelity"]["items"] == 4
