"""The annotation app: fixed pairs (or N-way sets, expanded to every pair) judged on several criteria.

Unlike the arena, items are fixed and assigned: each item goes to ``annotators_per_item`` different annotators,
left/right counterbalanced at random, every assignment recorded as a battle of mode "task". Golden pairs (known
answers) come first as a qualification set and measure each annotator; agreement (Cohen's and Fleiss' κ) shows
whether the criteria are being read the same way. Items come from a pairs JSONL, a preference dataset
(anything ``load_preferences`` reads) or contenders (galleries or generators) answering the same prompts.
"""

import html
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from apps.agreement import agreement_report
from apps.auth import RateLimiter, SessionKeys
from apps.contenders import ContenderConfig, build_contenders
from apps.flagging import FlaggingConfig, flag_suspicious
from apps.serve import Identity, LimitsConfig, ServerConfig, import_gradio, launch
from apps.store import Battle, VoteRejected, VoteStore, side_to_winner
from apps.uploads import UploadRejected, check_media, read_upload

UI_VERSION = "annotate-1"
CHOICES = ("A", "B", "Same")
_SIDE = {"A": "left", "B": "right", "Same": "tie", "same": "tie", "a": "left", "b": "right"}


@dataclass
class ItemsConfig:
    #: JSONL rows {prompt, a, b [, model_a, model_b, gold]}; media paths relative to the file; gold = A | B | tie
    pairs: Path | None = None
    #: a preference dataset (Pick-a-Pic parquet, HPDv2 json, jsonl folder): each pair becomes an item
    preferences: Path | None = None
    #: contenders answering ``prompts``: one output each per prompt, every pair of them an item (N-way sets)
    contenders: list[ContenderConfig] = field(default_factory=list)
    prompts: list[str] | str = field(default_factory=list)
    #: at most this many items from each source (0 = all)
    limit: int = 0
    seed: int = 0


@dataclass
class AnnotateConfig:
    items: ItemsConfig
    db: Path = Path("runs/annotate/votes.sqlite")
    title: str = "diffalign annotation"
    modality: str = "image"
    criteria: list[str] = field(default_factory=lambda: ["overall", "text_alignment", "fidelity", "aesthetics"])
    annotators_per_item: int = 3
    #: golden pairs (same JSONL format, ``gold`` required): shown first to every annotator
    gold: Path | None = None
    device: str = "cpu"
    server: ServerConfig = field(default_factory=lambda: ServerConfig(open_mode=True))
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    flagging: FlaggingConfig = field(default_factory=FlaggingConfig)
    busy_timeout_s: float = 30.0
    synchronous: str = "NORMAL"

    def __post_init__(self) -> None:
        if not self.criteria:
            raise ValueError("criteria: list at least one (the first is the headline preference)")
        bad = [c for c in self.criteria if not c.replace("_", "").isalnum()]
        if bad or len(set(self.criteria)) != len(self.criteria):
            raise ValueError(f"criteria must be unique identifiers (letters, digits, _), got {self.criteria}")
        if self.annotators_per_item < 1:
            raise ValueError(f"annotators_per_item must be ≥ 1, got {self.annotators_per_item}")


# --- importing items ------------------------------------------------------------------------------------------------
def _gold_answer(value, where: str) -> str | None:
    if value is None:
        return None
    mapping = {"a": "model_a", "b": "model_b", "tie": "tie", "same": "tie", "model_a": "model_a",
               "model_b": "model_b"}
    key = str(value).strip().lower()
    if key not in mapping:
        raise ValueError(f"{where}: gold must be A, B or tie, got {value!r}")
    return mapping[key]


def import_pairs_jsonl(store: VoteStore, path: Path, kind: str, *, require_gold: bool = False, limit: int = 0,
                       max_bytes: int = 200 * 2**20) -> int:
    """Add every row of a pairs JSONL; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    n = 0
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg})") from None
        missing = [k for k in ("prompt", "a", "b") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        gold = _gold_answer(row.get("gold"), where)
        if require_gold and gold is None:
            raise ValueError(f"{where}: golden pairs need a 'gold' answer (A, B or tie)")
        shas = []
        for key in ("a", "b"):
            media_path = Path(row[key])
            media_path = media_path if media_path.is_absolute() else path.parent / media_path
            if not media_path.is_file():
                raise FileNotFoundError(f"{where}: {key} = {row[key]!r} not found")
            media = check_media(media_path.read_bytes(), allowed=(kind,), max_bytes=max_bytes, what=f"{where}: {key}")
            shas.append(store.put_media(media.data, media.ext, media.kind))
        store.add_item(prompt=str(row["prompt"]), model_a=str(row.get("model_a", "a")),
                       model_b=str(row.get("model_b", "b")), media_a=shas[0], media_b=shas[1], gold=gold,
                       source=str(path))
        n += 1
        if limit and n >= limit:
            break
    return n


def import_preferences(store: VoteStore, path: Path, *, limit: int = 0, seed: int = 0) -> int:
    """Each preference pair becomes an item; which image is A is random (models "chosen"/"rejected" record where
    it came from, so agreement with the dataset's own label can be measured later)."""
    from diffalign.data.preference import load_preferences
    from diffalign.media import encode_image_bytes

    rng = random.Random(seed)
    data = load_preferences(path, ties="keep")
    n = 0
    for k in range(len(data)):
        pair = data[k]
        sides = [("chosen", pair.chosen_image()), ("rejected", pair.rejected_image())]
        if rng.random() < 0.5:
            sides.reverse()
        shas = [store.put_media(encode_image_bytes(img, "PNG"), ".png", "image") for _, img in sides]
        store.add_item(prompt=pair.prompt, model_a=sides[0][0], model_b=sides[1][0], media_a=shas[0],
                       media_b=shas[1], source=str(path))
        n += 1
        if limit and n >= limit:
            break
    return n


def import_contenders(store: VoteStore, cfg: AnnotateConfig) -> int:
    """N-way sets: one output per contender per prompt, expanded to all C(N, 2) pairs (same ``group_id``)."""
    items = cfg.items
    contenders = build_contenders(items.contenders, cfg.modality, cfg.device)
    prompts = items.prompts
    if isinstance(prompts, str):
        from diffalign.toyworld.prompts import prompt_set

        prompts = prompt_set(prompts)
    common = None
    for c in contenders:
        p = c.prompts()
        if p is not None:
            common = p if common is None else common & p
    chosen = sorted(common) if common is not None else list(prompts)
    if common is not None and prompts:
        chosen = [p for p in prompts if p in common]
    if not chosen:
        raise ValueError("items.contenders share no prompt (and items.prompts names none they all have)")
    if items.limit:
        chosen = chosen[: items.limit]
    rng = random.Random(items.seed)
    n = 0
    for prompt in chosen:
        outputs = [(c.name, c.produce(prompt, rng, store)[0]) for c in contenders]
        for (ma, sa), (mb, sb) in itertools.combinations(outputs, 2):
            store.add_item(prompt=prompt, model_a=ma, model_b=mb, media_a=sa, media_b=sb, group_id=prompt,
                           source="contenders")
            n += 1
    return n


def import_items(store: VoteStore, cfg: AnnotateConfig) -> int:
    n = 0
    if cfg.gold is not None:
        n += import_pairs_jsonl(store, cfg.gold, cfg.modality, require_gold=True)
    if cfg.items.pairs is not None:
        n += import_pairs_jsonl(store, cfg.items.pairs, cfg.modality, limit=cfg.items.limit)
    if cfg.items.preferences is not None:
        n += import_preferences(store, cfg.items.preferences, limit=cfg.items.limit, seed=cfg.items.seed)
    if cfg.items.contenders:
        n += import_contenders(store, cfg)
    if not store.items():
        raise ValueError("no annotation items: set items.pairs, items.preferences or items.contenders (or gold)")
    return n


# --- the logic ------------------------------------------------------------------------------------------------------
class Annotation:
    def __init__(self, cfg: AnnotateConfig, store: VoteStore | None = None, *, import_now: bool = True):
        self.cfg = cfg
        self.store = store or VoteStore(cfg.db, busy_timeout_s=cfg.busy_timeout_s, synchronous=cfg.synchronous)
        if import_now:
            import_items(self.store, cfg)
        self._rng = random.Random()
        self.limiter = RateLimiter(cfg.limits.battles_per_minute, 60.0)
        self._votes_per_address = cfg.limits.per_address(cfg.server.open_mode)[0]

    def next_task(self, judge: str, session_hash: str | None) -> Battle | None:
        """The open task of this session (so a reload resumes it), else a new assignment; None when all done."""
        open_task = self.store.open_task(judge, session_hash)
        if open_task is not None:
            return open_task
        if not self.limiter.allow(judge):
            raise VoteRejected(f"too many requests: at most {self.cfg.limits.battles_per_minute} per minute")
        item = self.store.next_item_for(judge, self.cfg.annotators_per_item)
        if item is None:
            return None
        return self.store.issue_battle(mode="task", item_id=item["item_id"], prompt=item["prompt"],
                                       model_a=item["model_a"], model_b=item["model_b"], media_a=item["media_a"],
                                       media_b=item["media_b"], left_is_a=self._rng.random() < 0.5,
                                       issued_to=judge, session_hash=session_hash)

    def submit(self, battle_id: str, judge: str, answers: dict, *, both_bad: bool = False,
               session_hash: str | None, ip: str | None = None, vote_id: str | None = None):
        """``answers``: {criterion: "A" | "B" | "Same"} as shown (A = left). Every criterion must be answered."""
        if not isinstance(answers, dict):
            raise VoteRejected("answers must be a mapping of criterion to A, B or Same")
        unknown = sorted(set(answers) - set(self.cfg.criteria))
        if unknown:
            raise VoteRejected(f"unknown criteria: {', '.join(unknown)}")
        missing = [c for c in self.cfg.criteria if not answers.get(c)]
        if missing:
            raise VoteRejected(f"please answer: {', '.join(missing)}")
        sides = {}
        for c in self.cfg.criteria:
            side = _SIDE.get(str(answers[c]))
            if side is None:
                raise VoteRejected(f"{c}: answer must be A, B or Same, got {answers[c]!r}")
            sides[c] = side
        battle = self.store.battle(str(battle_id or ""))
        if battle is None or battle.mode != "task":
            raise VoteRejected("no such task: answers are accepted only for tasks this server assigned")
        stored = {c: side_to_winner(s, battle.left_is_a) for c, s in sides.items()}
        primary = "bothbad" if both_bad else sides[self.cfg.criteria[0]]
        latency = (time.time() - battle.issued_at) * 1000.0
        return self.store.record_vote(battle.battle_id, judge, primary, vote_id=vote_id, session_hash=session_hash,
                                      ip=ip, answers=stored, latency_ms=latency, ui_version=UI_VERSION,
                                      rate_limit=(self.cfg.limits.votes_per_minute, 60.0),
                                      ip_rate_limit=_per_minute(self._votes_per_address))

    def progress_text(self, judge: str) -> str:
        p = self.store.progress(judge, self.cfg.annotators_per_item)
        gold = (f" · golden pairs {p['gold_correct']}/{p['gold_seen']} correct" if p["gold_seen"] else "")
        return f"**Progress:** {p['done']} of {p['total']} items{gold}"

    def add_pair(self, prompt: str, path_a: str, path_b: str, gold: str | None) -> str:
        """Admin upload of one pair: both files checked by content before anything is stored."""
        if not prompt or not prompt.strip():
            raise UploadRejected("the pair needs a prompt")
        limits = dict(allowed=(self.cfg.modality,), max_bytes=int(self.cfg.limits.max_upload_mb * 2**20),
                      max_pixels=int(self.cfg.limits.max_upload_megapixels * 1e6))
        a = read_upload(path_a, what="upload A", **limits)
        b = read_upload(path_b, what="upload B", **limits)
        gold_answer = _gold_answer(gold or None, "gold")
        sha_a = self.store.put_media(a.data, a.ext, a.kind)
        sha_b = self.store.put_media(b.data, b.ext, b.kind)
        return self.store.add_item(prompt=prompt.strip(), model_a="upload-a", model_b="upload-b", media_a=sha_a,
                                   media_b=sha_b, gold=gold_answer, source="upload")

    def annotator_table(self) -> list[list]:
        rows = []
        flags = self.store.flags()
        judges = [r["judge"] for r in self.store.read("SELECT DISTINCT judge FROM votes ORDER BY judge")]
        for j in judges:
            p = self.store.progress(j, self.cfg.annotators_per_item)
            acc = None if p["gold_accuracy"] is None else round(p["gold_accuracy"], 3)
            rows.append([j, p["done"], p["total"], acc, "; ".join(flags.get(j, {}).get("reasons", []))])
        return rows

    def agreement_table(self) -> list[list]:
        rows = agreement_report(self.store.vote_rows(), self.cfg.criteria)
        return [[r["criterion"], r["items"], r["annotators"],
                 None if r["cohen_mean"] is None else round(r["cohen_mean"], 3),
                 None if r["fleiss"] is None else round(r["fleiss"], 3)] for r in rows]


def _per_minute(limit: int | None) -> tuple[int, float] | None:
    return (limit, 60.0) if limit else None


# --- Gradio ---------------------------------------------------------------------------------------------------------
def build_annotate_ui(app: Annotation):
    gr = import_gradio()
    from apps.arena import _media_component, page_js
    from apps.display import DisplayMedia

    display = DisplayMedia(app.store)  # small images enlarged (nearest-neighbour) for the page; originals kept

    ident = Identity(app.cfg.server, SessionKeys.beside(app.store.path))
    crits = app.cfg.criteria

    def task(request: gr.Request):
        try:
            judge, session, _ip = ident(request)
            b = app.next_task(judge, session)
        except (PermissionError, VoteRejected) as exc:
            raise gr.Error(str(exc)) from None
        resets = [gr.update(value=None) for _ in crits] + [gr.update(value=False)]
        if b is None:
            return [app.progress_text(judge), "### All done — thank you!", None, None, ""] + resets
        left = display.path(b.left[1])
        right = display.path(b.right[1])
        return [app.progress_text(judge), f"### Prompt: {html.escape(b.prompt)}", left, right, b.battle_id] + resets

    def submit(battle_id: str, answers: dict, both_bad: bool, vote_id: str, request: gr.Request) -> dict:
        """Answer a task from /next_task: answers maps each criterion to A, B or Same (A = the left item)."""
        try:
            judge, session, ip = ident(request)
            vote = app.submit(battle_id, judge, answers, both_bad=bool(both_bad), session_hash=session, ip=ip,
                              vote_id=vote_id or None)
        except (PermissionError, VoteRejected) as exc:
            raise gr.Error(str(exc)) from None
        return {"vote_id": vote.vote_id, "battle_id": vote.battle_id, "answers": vote.answers,
                "replayed": vote.replayed, "progress": app.store.progress(judge, app.cfg.annotators_per_item)}

    def stats(request: gr.Request):
        table = app.annotator_table() if ident.is_admin(request) else []
        return app.agreement_table(), table

    def add_pair(prompt: str, file_a: str, file_b: str, gold: str, request: gr.Request) -> str:
        """Admins: add one pair (two media files checked by content, stored by hash) with an optional gold answer."""
        if not ident.is_admin(request):
            raise gr.Error("admins only")
        try:
            return app.add_pair(prompt, file_a, file_b, None if gold in (None, "", "none") else gold)
        except (UploadRejected, ValueError) as exc:
            raise gr.Error(str(exc)) from None

    def do_flag(request: gr.Request) -> dict:
        if not ident.is_admin(request):
            raise gr.Error("admins only")
        flag_suspicious(app.store, app.cfg.flagging)
        return app.store.flags()

    with gr.Blocks(title=app.cfg.title) as demo:
        gr.Markdown(f"# {html.escape(app.cfg.title)}\nCompare A and B on every criterion. *Same* is fine when "
                    "neither is better; tick *both are bad* when neither is acceptable.")
        with gr.Tab("Annotate"):
            progress = gr.Markdown()
            prompt_md = gr.Markdown()
            with gr.Row():
                left = _media_component(gr, app.cfg.modality, "A")
                right = _media_component(gr, app.cfg.modality, "B")
            task_box = gr.Textbox(visible=False)
            radios = [gr.Radio(list(CHOICES), label=c.replace("_", " "), value=None) for c in crits]
            both_bad = gr.Checkbox(label="both are bad", value=False)
            with gr.Row():
                send = gr.Button("Submit and next", variant="primary")
                reload_btn = gr.Button("Reload task")
        with gr.Tab("Statistics"):
            agree = gr.Dataframe(headers=["criterion", "items", "annotators", "Cohen κ (mean)", "Fleiss κ"],
                                 interactive=False, label="agreement")
            people = gr.Dataframe(headers=["annotator", "done", "items", "gold accuracy", "flags"],
                                  interactive=False, label="annotators (admins only)")
            refresh = gr.Button("Refresh")
        if app.cfg.server.admins:
            with gr.Tab("Admin"):
                new_prompt = gr.Textbox(label="prompt")
                with gr.Row():
                    file_a = gr.File(label="A", type="filepath")
                    file_b = gr.File(label="B", type="filepath")
                gold = gr.Radio(["none", "A", "B", "tie"], value="none", label="gold answer")
                add = gr.Button("Add pair")
                added = gr.Textbox(label="item id", interactive=False)
                add.click(add_pair, [new_prompt, file_a, file_b, gold], added, api_name="add_pair")
                flag_btn = gr.Button("Flag suspicious annotators")
                flag_out = gr.JSON(label="flags")
                flag_btn.click(do_flag, None, flag_out, api_name="flag")

        outs = [progress, prompt_md, left, right, task_box] + radios + [both_bad]
        demo.load(None, None, None, js=page_js({}), api_visibility="private")  # the media style sheet
        # tasks and answers skip Gradio's queue, as the arena's votes do: one plain request each (apps.arena)
        fast = dict(queue=False)
        demo.load(task, None, outs, api_visibility="private", **fast)

        def ui_submit(data: dict, request: gr.Request):
            answers = {c: data[r] for c, r in zip(crits, radios)}
            submit(data[task_box], answers, data[both_bad], "", request)
            return task(request)

        send.click(ui_submit, {task_box, both_bad, *radios}, outs, api_visibility="private", **fast)
        reload_btn.click(task, None, outs, api_name="next_task", **fast)
        gr.api(submit, api_name="submit", **fast)
        refresh.click(stats, None, [agree, people], api_name="stats")
    return demo


def load_annotate_config(config_path, overrides: Sequence[str] = ()) -> AnnotateConfig:
    from diffalign.config import load_config

    return load_config(AnnotateConfig, config_path, overrides)


def serve(cfg: AnnotateConfig, *, block: bool = True, port: int | None = None):
    app = Annotation(cfg)
    demo = build_annotate_ui(app)
    launch(demo, cfg.server, keys=SessionKeys.beside(app.store.path), limits=cfg.limits,
           uploads=bool(cfg.server.admins), static_paths=[app.store.media_dir], block=block, port=port)
    return demo, app


def main(config_path, overrides: Sequence[str] = ()) -> int:
    serve(load_annotate_config(config_path, overrides), block=True)
    return 0
