"""The arena: anonymous side-by-side battles, votes, and a leaderboard with confidence intervals.

``Arena`` holds the logic (issue a battle, accept a vote, compute the board) and is usable without Gradio;
``build_arena_ui`` wraps it in Gradio Blocks. The browser only ever holds an opaque battle id: which model is on
which side lives in the database until the vote is stored, and a vote is accepted only for a battle the server
issued to that judge in that session (see ``VoteStore.record_vote``). Gradio API clients use ``/new_battle``
and ``/vote`` (with an optional idempotency key); the buttons use the same code path. Programmatic voters get a
lean JSON API on the same server (``apps.rest``: ``POST /api/v1/battle``, ``POST /api/v1/vote``) that skips
Gradio's queue but calls the same ``Arena`` methods, so the same checks apply.
"""

import csv
import html
import io
import random
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from apps.auth import RateLimiter, SessionKeys
from apps.battle_pool import BattlePool, ContenderFailed, Prepared, prepare
from apps.contenders import Contender, ContenderConfig, build_contenders, shared_prompts
from apps.display import MIN_DISPLAY_PX, DisplayMedia, media_css
from apps.flagging import FlaggingConfig
from apps.ratings import RatingRow, leaderboard, pair_table, win_rate_matrix
from apps.serve import Identity, LimitsConfig, ServerConfig, import_gradio, launch
from apps.store import SIDES, Battle, RateLimited, VoteRejected, VoteStore

UI_VERSION = "arena-2"
#: plain words: emoji render as empty boxes where no emoji font is installed
SIDE_LABELS = {"left": "A is better", "right": "B is better", "tie": "Tie", "bothbad": "Both are bad"}
#: keyboard shortcuts (any one of the keys) per choice, and for a new round
SIDE_KEYS = {"left": ("a", "1", "ArrowLeft"), "right": ("b", "2", "ArrowRight"), "tie": ("t", "3"),
             "bothbad": ("x", "4")}
NEW_ROUND_KEYS = ("n",)


@dataclass
class LeaderboardConfig:
    bootstrap_rounds: int = 200
    seed: int = 42
    #: Gaussian prior on strengths; keeps an unbeaten model finite while votes are few
    l2: float = 0.1
    #: models with fewer rated battles are listed as "preliminary"
    min_battles: int = 20
    #: below this many votes a model's (or a pair's) interval is shown as "not enough votes": a bootstrap over a
    #: handful of identical outcomes gives a zero-width interval that would read as certainty
    min_votes_for_ci: int = 5
    exclude_flagged: bool = True

    def __post_init__(self) -> None:
        if self.bootstrap_rounds < 1:
            raise ValueError(f"leaderboard.bootstrap_rounds must be ≥ 1, got {self.bootstrap_rounds}")
        if self.l2 < 0:
            raise ValueError(f"leaderboard.l2 must be ≥ 0, got {self.l2}")
        if self.min_votes_for_ci < 1:
            raise ValueError(f"leaderboard.min_votes_for_ci must be ≥ 1, got {self.min_votes_for_ci}")


@dataclass
class PoolConfig:
    """Battles prepared ahead of time per contender pair (``apps.battle_pool``)."""

    enabled: bool = True
    per_pair: int = 4

    def __post_init__(self) -> None:
        if self.per_pair < 1:
            raise ValueError(f"pool.per_pair must be ≥ 1, got {self.per_pair}")


@dataclass
class ArenaConfig:
    contenders: list[ContenderConfig]
    db: Path = Path("runs/arena/votes.sqlite")
    title: str = "diffalign arena"
    #: image | video | audio | 3d — one per arena, so both sides are always comparable
    modality: str = "image"
    #: prompts for live contenders: a list, or a toy prompt set name ("toy-all")
    prompts: list[str] | str = field(default_factory=list)
    device: str = "cpu"
    server: ServerConfig = field(default_factory=lambda: ServerConfig(open_mode=True))
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    leaderboard: LeaderboardConfig = field(default_factory=LeaderboardConfig)
    flagging: FlaggingConfig = field(default_factory=FlaggingConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    #: images smaller than this are enlarged (nearest-neighbour) for display; the store keeps the original
    min_display_px: int = MIN_DISPLAY_PX
    busy_timeout_s: float = 30.0
    synchronous: str = "NORMAL"
    seed: int | None = None

    def prompt_list(self) -> list[str]:
        if isinstance(self.prompts, str):
            from diffalign.toyworld.prompts import prompt_set

            return prompt_set(self.prompts)
        return list(self.prompts)


class Arena:
    """Battles and votes over a vote store; thread-safe (Gradio calls it from a thread pool)."""

    def __init__(self, cfg: ArenaConfig, store: VoteStore | None = None,
                 contenders: Sequence[Contender] | None = None):
        self.cfg = cfg
        self.store = store or VoteStore(cfg.db, busy_timeout_s=cfg.busy_timeout_s, synchronous=cfg.synchronous)
        self.contenders = {c.name: c for c in (contenders or build_contenders(cfg.contenders, cfg.modality,
                                                                                cfg.device, store=self.store))}
        self.prompts = cfg.prompt_list()
        pairs = [(a, b) for a in self.contenders for b in self.contenders
                 if a < b and shared_prompts(self.contenders[a], self.contenders[b], self.prompts)]
        if not pairs:
            raise ValueError("no two contenders share a prompt (check the galleries' prompt.txt files, or set "
                             "'prompts' for live generators)")
        self._rng = random.Random(cfg.seed)
        self._rng_lock = threading.Lock()
        self.battle_limiter = RateLimiter(cfg.limits.battles_per_minute, 60.0)
        self.votes_per_address, battles_per_address = cfg.limits.per_address(cfg.server.open_mode)
        self.address_limiter = RateLimiter(battles_per_address, 60.0) if battles_per_address else None
        self._board_cache: tuple[int, Any] | None = None
        self._board_lock = threading.Lock()
        self.display = DisplayMedia(self.store, cfg.min_display_px)
        #: the rotation (pairs in play, retired contenders) lives here, whether or not battles are prepared ahead
        self.pool = BattlePool(self.contenders, pairs, self.prompts, self.store, per_pair=cfg.pool.per_pair,
                               seed=cfg.seed, prefill=cfg.pool.enabled)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Contender pairs still in the rotation."""
        return self.pool.pairs()

    @property
    def retired(self) -> dict[str, str]:
        """Contenders taken out of the rotation after failing to sample: name -> error."""
        return self.pool.retired()

    def retire(self, name: str, error: BaseException) -> None:
        """Take a contender out of the rotation (its stored votes and battles stay as they are)."""
        self.pool.retire(name, error)

    def close(self) -> None:
        self.pool.stop()

    # --- battles and votes ------------------------------------------------------------------------------------------
    def new_battle(self, judge: str, session_hash: str | None, ip: str | None = None) -> Battle:
        """A battle prepared by the pool (a uniformly random pair among those ready, a prompt both can answer;
        uniform pairs keep the Bradley–Terry fit unbiased), sides drawn here at random; sampled on this thread only
        when nothing is prepared yet. Rate-limited per judge and per client address."""
        if self.address_limiter is not None and ip and not self.address_limiter.allow(ip):
            raise RateLimited(f"too many new rounds from your address: at most {self.address_limiter.limit} per "
                              "minute")
        if not self.battle_limiter.allow(judge):
            raise RateLimited(f"too many new rounds: at most {self.cfg.limits.battles_per_minute} per minute")
        self.pool.start()  # the refill thread, once (not when battles are not prepared ahead)
        ready = self.pool.take()
        if ready is None:  # cold start (or no prefill): sample on this thread
            ready = self._prepare_now()
        with self._rng_lock:
            left_is_a = self._rng.random() < 0.5
        return self.store.issue_battle(prompt=ready.prompt, model_a=ready.model_a, model_b=ready.model_b,
                                       media_a=ready.media_a, media_b=ready.media_b, left_is_a=left_is_a,
                                       issued_to=judge, session_hash=session_hash, params=ready.params)

    def _prepare_now(self) -> Prepared:
        """One battle sampled here and now; a contender that fails is retired and another pair is tried."""
        while True:
            pairs = self.pool.pairs()
            if not pairs:
                raise VoteRejected("no contenders are available right now (they failed to sample: "
                                   + "; ".join(f"{n}: {e}" for n, e in sorted(self.retired.items())) + ")")
            with self._rng_lock:
                pair = self._rng.choice(pairs)
                rng = random.Random(self._rng.randrange(2**63))
            try:
                return prepare(self.contenders, pair, self.prompts, self.store, rng)
            except ContenderFailed as exc:
                self.retire(exc.name, exc.error)

    def vote(self, battle_id: str, judge: str, side: str, *, session_hash: str | None, ip: str | None = None,
             vote_id: str | None = None) -> dict:
        """Store the vote (or raise VoteRejected) and reveal the battle's models."""
        if side not in SIDES:
            raise VoteRejected(f"unknown choice {side!r}; expected one of {', '.join(SIDES)}")
        battle = self.store.battle(str(battle_id or ""))
        latency = None if battle is None else (time.time() - battle.issued_at) * 1000.0
        vote = self.store.record_vote(str(battle_id or ""), judge, side, vote_id=vote_id or None,
                                      session_hash=session_hash, ip=ip, latency_ms=latency, ui_version=UI_VERSION,
                                      rate_limit=(self.cfg.limits.votes_per_minute, 60.0),
                                      ip_rate_limit=(self.votes_per_address, 60.0) if self.votes_per_address else None)
        battle = battle if battle is not None and battle.battle_id == vote.battle_id else \
            self.store.battle(vote.battle_id)
        return {"vote_id": vote.vote_id, "battle_id": battle.battle_id, "side": vote.side, "winner": vote.winner,
                "left_model": battle.left[0], "right_model": battle.right[0], "replayed": vote.replayed}

    def media_path(self, sha: str) -> str:
        """The file the browser shows for a stored medium (small images enlarged, never blurred)."""
        return self.display.path(sha)

    # --- leaderboard ------------------------------------------------------------------------------------------------
    def board(self) -> dict:
        """Everything one leaderboard refresh shows, from one read of the rated votes: rows (best first), the
        win-rate matrix and the per-pair table. Recomputed only when the number of rated votes or of flags changed
        (checked with a COUNT, not by reading the votes)."""
        lb = self.cfg.leaderboard
        key = (self.store.count_rated_battles(exclude_flagged=lb.exclude_flagged), len(self.store.flags()))
        with self._board_lock:
            if self._board_cache is not None and self._board_cache[0] == key:
                return self._board_cache[1]
        battles = self.store.rated_battles(exclude_flagged=lb.exclude_flagged)
        rows = leaderboard(battles, lb.bootstrap_rounds, seed=lb.seed, l2=lb.l2) if battles else []
        models, rate, count = win_rate_matrix(battles) if battles else ([], None, None)
        result = {"rows": rows, "models": models, "win_rate": rate, "count": count, "votes": len(battles),
                  "pairs": pair_table(battles) if battles else []}
        with self._board_lock:  # keyed by what was read: a vote that landed after the COUNT is in these rows
            self._board_cache = ((len(battles), key[1]), result)
        return result

    def too_few_votes(self, row: RatingRow) -> bool:
        """Whether a model's interval reads "not enough votes": from fewer than ``min_votes_for_ci`` votes, or of
        zero width (a bootstrap over a handful of identical outcomes), which would read as certainty."""
        return row.battles < self.cfg.leaderboard.min_votes_for_ci or row.upper - row.lower <= 1e-9

    def board_table(self, board: dict | None = None) -> list[list]:
        """Leaderboard rows of ``board`` (default: ``self.board()``), intervals per ``too_few_votes``."""
        lb = self.cfg.leaderboard
        out = []
        for r in (self.board() if board is None else board)["rows"]:
            prelim = " (preliminary)" if r.battles < lb.min_battles else ""
            ci = NOT_ENOUGH if self.too_few_votes(r) else f"+{r.upper - r.rating:.1f} / -{r.rating - r.lower:.1f}"
            out.append([r.rank, r.model + prelim, round(r.rating, 1), ci, round(r.elo, 1), r.battles,
                        round(r.wins / r.battles, 3) if r.battles else None])
        return out

    def pair_rows(self, board: dict | None = None) -> list[list]:
        """Votes per contender pair of ``board``: A's score rate (ties ½) with its 95% interval, or "not enough
        votes"."""
        lb = self.cfg.leaderboard
        out = []
        for r in (self.board() if board is None else board)["pairs"]:
            ci = NOT_ENOUGH if r.votes < lb.min_votes_for_ci else f"[{r.lower:.2f}, {r.upper:.2f}]"
            out.append([r.model_a, r.model_b, r.votes, r.wins_a, r.wins_b, r.ties, round(r.score_a, 3), ci])
        return out

    def board_csv(self, board: dict | None = None) -> str:
        """The leaderboard as CSV text (numbers unrounded; an empty interval where there are not enough votes)."""
        lb = self.cfg.leaderboard
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["rank", "model", "rating", "ci_lower", "ci_upper", "online_elo", "votes", "score_rate",
                    "preliminary", "not_enough_votes"])
        for r in (self.board() if board is None else board)["rows"]:
            few = self.too_few_votes(r)
            w.writerow([r.rank, r.model, f"{r.rating:.3f}", "" if few else f"{r.lower:.3f}",
                        "" if few else f"{r.upper:.3f}", f"{r.elo:.3f}", r.battles,
                        f"{r.wins / r.battles:.4f}" if r.battles else "", int(r.battles < lb.min_battles), int(few)])
        return buf.getvalue()

    def board_view(self) -> tuple[list[list], list[list], str, str]:
        """One leaderboard refresh (the Leaderboard tab): table, pair rows, win-rate heat map and a summary line,
        all from one ``board()``."""
        board = self.board()
        summary = f"{board['votes']} rated votes" + (" (flagged judges excluded)"
                                                     if self.cfg.leaderboard.exclude_flagged else "")
        retired = self.retired
        if retired:
            summary += " · out of the rotation: " + ", ".join(sorted(retired))
        return self.board_table(board), self.pair_rows(board), heatmap_html(board), summary


NOT_ENOUGH = "not enough votes"
TABLE_HEADERS = ["rank", "model", "rating (BT)", "95% CI", "online Elo", "votes", "score rate"]
PAIR_HEADERS = ["model A", "model B", "votes", "A wins", "B wins", "ties", "A score rate", "95% CI"]


def heatmap_html(board: dict) -> str:
    """Win-rate matrix as a coloured HTML table (row model's share of decisive wins against the column model)."""
    models, rate, count = board["models"], board["win_rate"], board["count"]
    if not models:
        return "<p>No votes yet.</p>"
    order = [r.model for r in board["rows"]]
    idx = [models.index(m) for m in order]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in order)
    body = []
    for i in idx:
        cells = []
        for j in idx:
            if i == j or count[i, j] == 0:
                cells.append("<td style='background:#eee'>–</td>")
                continue
            v = float(rate[i, j])
            red, green = int(255 * (1 - v)), int(255 * v)
            cells.append(f"<td style='background:rgb({red},{green},120);color:#000' title='{int(count[i, j])} "
                         f"decisive battles'>{v:.2f}</td>")
        body.append(f"<tr><th>{html.escape(models[i])}</th>{''.join(cells)}</tr>")
    return ("<table class='winrate'><tr><th>win rate (row vs column)</th>" + head + "</tr>" + "".join(body)
            + "</table>")


# --- Gradio ---------------------------------------------------------------------------------------------------------
#: every media panel gets this class (``media_css`` sizes it and keeps small images sharp)
MEDIA_CLASS = "diffalign-media"
#: component height in pixels: room for a 256-pixel-or-larger image plus the label
MEDIA_HEIGHT = 400


def _media_component(gr, kind: str, label: str):
    """The panel for one side: images at a readable size (the server enlarges small ones with nearest-neighbour,
    the page draws them pixelated), video and audio with players, 3D in Gradio's viewer."""
    common = dict(label=label, interactive=False, elem_classes=[MEDIA_CLASS])
    if kind == "image":
        return gr.Image(type="filepath", format="png", height=MEDIA_HEIGHT, **common)
    if kind == "video":
        return gr.Video(autoplay=False, loop=True, height=MEDIA_HEIGHT, **common)
    if kind == "audio":
        return gr.Audio(type="filepath", **common)
    return gr.Model3D(height=MEDIA_HEIGHT, **common)


def page_js(shortcuts: dict[str, Sequence[str]], min_px: int = MIN_DISPLAY_PX) -> str:
    """Browser code run once on page load: adds ``media_css(min_px)`` to the page and a keydown listener that clicks the
    button with the element id mapped to the pressed key (ignored while typing in a field, with a modifier held,
    or when the button is disabled or on a hidden tab). Passed as an event's ``js``, so no server file is needed."""
    import json

    keymap = {k: elem_id for elem_id, keys in shortcuts.items() for k in keys}
    return ("() => {"
            f"const css = {json.dumps(media_css(min_px))}; const keys = {json.dumps(keymap)};"
            "if (!document.getElementById('diffalign-style')) {"
            "  const st = document.createElement('style'); st.id = 'diffalign-style'; st.textContent = css;"
            "  document.head.appendChild(st); }"
            "if (window.__diffalignKeys) return; window.__diffalignKeys = true;"
            "document.addEventListener('keydown', (e) => {"
            "  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;"
            "  const t = e.target; const tag = t && t.tagName;"
            "  if (tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT' || (t && t.isContentEditable)) return;"
            "  const id = keys[e.key.length === 1 ? e.key.toLowerCase() : e.key]; if (!id) return;"
            "  const el = document.getElementById(id); if (!el) return;"
            "  const btn = el.tagName === 'BUTTON' ? el : el.querySelector('button');"
            "  if (!btn || btn.disabled || btn.offsetParent === null) return;"
            "  e.preventDefault(); btn.click(); });"
            "}")


def _key_help() -> str:
    names = {"ArrowLeft": "←", "ArrowRight": "→"}
    parts = [f"{SIDE_LABELS[s]}: " + " / ".join(names.get(k, k.upper()) for k in SIDE_KEYS[s]) for s in SIDES]
    return "Keys: " + " · ".join(parts) + " · New round: " + " / ".join(k.upper() for k in NEW_ROUND_KEYS)


def _csv_file(text: str, prefix: str) -> str:
    """Write ``text`` to a new file in the temp dir (Gradio serves files from there) and return its path."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".csv")
    with open(fd, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return path


def export_dir(arena: Arena) -> Path:
    """Where the admin view keeps training-data exports. Never an allowed path of the server: Gradio serves those
    to anyone signed in, while only admins may read votes (``export_for_admin`` hands them a copy)."""
    return arena.store.path.parent / "exports"


def export_for_admin(arena: Arena, exclude_flagged: bool) -> tuple[str, Path]:
    """Write the votes to a new file in ``export_dir`` (kept there) and return (a copy of it in a fresh temp folder,
    the kept file). Only the copy is handed to Gradio, which moves it into its own cache for that one download;
    the name carries 64 random bits so no other file name is guessable from it."""
    from apps.export import export_votes

    name = f"votes-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}.parquet"
    kept = export_votes(arena.cfg.db, export_dir(arena) / name, exclude_flagged=bool(exclude_flagged))
    copy = Path(tempfile.mkdtemp(prefix="arena-export-")) / name
    shutil.copyfile(kept, copy)
    return str(copy), kept


def build_arena_ui(arena: Arena):
    """Gradio Blocks: Arena tab (battle + votes + reveal), Leaderboard tab, and an Admin tab for flagging and
    exporting. A vote button stores the vote, reveals that battle and shows the next one in one response; votes and
    battles skip Gradio's queue (one HTTP request each), while the leaderboard's bootstrap is CPU-bound and queued
    two at a time, and admin work runs alone."""
    gr = import_gradio()
    ident = Identity(arena.cfg.server, SessionKeys.beside(arena.store.path))

    def shown(b: Battle, reveal: str = "") -> list:
        """What the Arena tab's outputs show for a fresh battle: prompt, both media, its id, a line, live buttons."""
        left, right = arena.media_path(b.left[1]), arena.media_path(b.right[1])
        buttons = [gr.update(interactive=True) for _ in SIDES]
        return [f"### Prompt: {html.escape(b.prompt)}", left, right, b.battle_id, reveal] + buttons

    def issue(request: gr.Request):
        try:
            judge, session, ip = ident(request)
            return shown(arena.new_battle(judge, session, ip))
        except (PermissionError, VoteRejected) as exc:
            raise gr.Error(str(exc)) from None

    def cast(side: str, battle_id: str, vote_id: str | None, request) -> dict:
        try:
            judge, session, ip = ident(request)
            return arena.vote(battle_id, judge, side, session_hash=session, ip=ip, vote_id=vote_id)
        except (PermissionError, VoteRejected) as exc:
            raise gr.Error(str(exc)) from None

    def reveal_text(result: dict) -> str:
        chosen = {"left": "A", "right": "B", "tie": "a tie", "bothbad": "both bad"}[result["side"]]
        return (f"Last round: **A** was **{html.escape(result['left_model'])}** · **B** was "
                f"**{html.escape(result['right_model'])}** — you voted {chosen}. Thanks! The next pair is below.")

    def vote_and_next(side: str, battle_id: str, request) -> list:
        """A button's vote: store it, reveal that battle's models and show the next battle, in one round trip (a
        person waits for one response between their click and the next pair). When no next battle can be issued
        (a rate limit, every contender retired) the vote stays stored and revealed, and the buttons wait for
        *New round*."""
        reveal = reveal_text(cast(side, battle_id, None, request))
        try:
            judge, session, ip = ident(request)
            return shown(arena.new_battle(judge, session, ip), reveal)
        except (PermissionError, VoteRejected) as exc:
            waiting = f"{reveal}\n\nNo next pair yet: {html.escape(str(exc))}"
            return [gr.update(), gr.update(), gr.update(), "", waiting] + [gr.update(interactive=False) for _ in SIDES]

    def vote_api(side: str, battle_id: str, vote_id: str, request: gr.Request) -> dict:
        """Vote on a battle issued by /new_battle: side is left, right, tie or bothbad; vote_id (optional) makes
        retries safe — the same id never stores a second vote. Empty vote_id: the server makes one."""
        return cast(side, battle_id, vote_id, request)

    def board_outputs():
        return arena.board_view()

    def board_csv() -> str:
        """The leaderboard as a CSV file."""
        return _csv_file(arena.board_csv(), "leaderboard-")

    with gr.Blocks(title=arena.cfg.title) as demo:
        gr.Markdown(f"# {html.escape(arena.cfg.title)}\nTwo anonymous models answer the same prompt. Vote for the "
                    "better one; their names are revealed after your vote.")
        with gr.Tab("Arena"):
            prompt_md = gr.Markdown(elem_id="arena-prompt", elem_classes=["diffalign-prompt"])
            with gr.Row(equal_height=True):
                left = _media_component(gr, arena.cfg.modality, "A")
                right = _media_component(gr, arena.cfg.modality, "B")
            battle_box = gr.Textbox(visible=False)  # an opaque id; identities stay server-side
            with gr.Row():
                buttons = [gr.Button(SIDE_LABELS[s], interactive=False, elem_id=f"vote-{s}") for s in SIDES]
            reveal = gr.Markdown()
            again = gr.Button("New round", variant="primary", elem_id="new-round")
            gr.Markdown(_key_help())
        with gr.Tab("Leaderboard") as lb_tab:
            summary = gr.Markdown()
            table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="leaderboard")
            gr.Markdown("Ratings: Bradley–Terry maximum likelihood on the Elo scale (base 1000), with bootstrap 95% "
                        "intervals; rank = 1 + models whose lower bound beats this model's upper bound. An interval "
                        f"from fewer than {arena.cfg.leaderboard.min_votes_for_ci} votes reads *{NOT_ENOUGH}*.")
            pairs = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, label="votes per pair")
            gr.Markdown("Per pair: A's score rate (wins + ½ ties) with a Wilson 95% interval.")
            heat = gr.HTML()
            with gr.Row():
                refresh = gr.Button("Refresh")
                csv_btn = gr.Button("Download CSV")
            csv_out = gr.File(label="leaderboard.csv", interactive=False)
        if arena.cfg.server.admins:
            with gr.Tab("Admin"):
                flag_btn = gr.Button("Flag suspicious judges")
                flag_out = gr.JSON(label="flags")
                gr.Markdown("**Export votes to training data** (Pick-a-Pic-style parquet that `diffalign train` "
                            "reads; ties as 0.5/0.5, both-bad flagged).")
                exclude = gr.Checkbox(label="exclude flagged judges", value=True)
                export_btn = gr.Button("Export to training data")
                export_file = gr.File(label="export", interactive=False)
                export_msg = gr.Markdown()

                def do_flag(request: gr.Request):
                    if not ident.is_admin(request):
                        raise gr.Error("admins only")
                    from apps.flagging import flag_suspicious

                    flag_suspicious(arena.store, arena.cfg.flagging)
                    return arena.store.flags()

                def do_export(exclude_flagged: bool, request: gr.Request):
                    """Admins: write the votes as a preference parquet (returns the file and a line saying where)."""
                    if not ident.is_admin(request):
                        raise gr.Error("admins only")
                    try:
                        copy, kept = export_for_admin(arena, bool(exclude_flagged))
                    except (ValueError, FileNotFoundError) as exc:
                        raise gr.Error(str(exc)) from None
                    return copy, f"Wrote `{kept}`"

                flag_btn.click(do_flag, None, flag_out, api_name="flag", concurrency_limit=1,
                               concurrency_id="arena_admin")
                export_btn.click(do_export, exclude, [export_file, export_msg], api_name="export",
                                 concurrency_limit=1, concurrency_id="arena_admin")

        outs = [prompt_md, left, right, battle_box, reveal] + buttons
        shortcuts = {f"vote-{s}": SIDE_KEYS[s] for s in SIDES} | {"new-round": NEW_ROUND_KEYS}
        demo.load(None, None, None, js=page_js(shortcuts, arena.cfg.min_display_px), api_visibility="private")
        # votes and battles skip Gradio's queue: each is one plain HTTP request (the page's client posts to
        # /gradio_api/run/...) answered from a thread, instead of a queue join plus a server-sent-event stream.
        # They are short (an SQLite write, a battle taken from the pool), so the queue's admission control buys
        # nothing here; the leaderboard's bootstrap and admin work stay queued.
        fast = dict(queue=False)
        demo.load(issue, None, outs, api_visibility="private", **fast)
        again.click(issue, None, outs, api_name="new_battle", **fast)

        def clicker(side: str):
            def on_click(battle_id: str, request: gr.Request):
                return vote_and_next(side, battle_id, request)

            return on_click

        for side, btn in zip(SIDES, buttons):
            btn.click(clicker(side), battle_box, outs, api_visibility="private", **fast)
        gr.api(vote_api, api_name="vote", **fast)
        board_events = dict(concurrency_limit=2, concurrency_id="arena_board")
        refresh.click(board_outputs, None, [table, pairs, heat, summary], api_name="leaderboard", **board_events)
        lb_tab.select(board_outputs, None, [table, pairs, heat, summary], api_visibility="private", **board_events)
        csv_btn.click(board_csv, None, csv_out, api_name="leaderboard_csv", **board_events)
    return demo


def load_arena_config(config_path: str | Path | dict, overrides: Sequence[str] = ()) -> ArenaConfig:
    from diffalign.config import load_config

    return load_config(ArenaConfig, config_path, overrides)


def serve(cfg: ArenaConfig, *, block: bool = True, port: int | None = None):
    """Build and launch; returns (demo, arena). With ``block=False`` the caller closes ``demo`` and ``arena``;
    with ``block=True`` the battle pool's thread is stopped when the server stops (or fails to start)."""
    from apps.rest import mount_rest

    arena = Arena(cfg)
    arena.pool.start()  # prepare battles before the first visitor arrives (when the pool prepares any)
    try:
        demo = build_arena_ui(arena)
        # only the media are served from disk, in place (content-addressed files that never change, so nothing is
        # copied or hashed per response); exports reach admins as copies (``export_for_admin``)
        launch(demo, cfg.server, keys=SessionKeys.beside(arena.store.path), limits=cfg.limits,
               static_paths=[arena.store.media_dir], block=block, port=port,
               on_app=lambda app: mount_rest(app, arena))
    except BaseException:  # a failed start (or Ctrl-C while blocking) leaves no pool thread behind
        arena.close()
        raise
    if block:
        arena.close()
    return demo, arena


def main(config_path: str | Path, overrides: Sequence[str] = ()) -> int:
    cfg = load_arena_config(config_path, overrides)
    serve(cfg, block=True)
    return 0
