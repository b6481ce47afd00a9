"""``nla-serve train``: the stages in order, each resumable from its outputs in the work dir.

    WORK/config.json            the TrainConfig (a resumed run must name the same target, layer, seed)
    WORK/corpus.jsonl           text documents of the non-chat sources          (stage corpus)
    WORK/chats.jsonl            transcripts the target wrote, appended per batch (stage corpus)
    WORK/genres.jsonl           the target's answers over the genre grid, per batch (stage corpus)
    WORK/activations/           layer-K rows + records, per part of documents   (stage collect)
    WORK/targets.jsonl          one explanation target per activation           (stage targets)
    WORK/pair.json              marker and injection scale, fixed once
    WORK/ar.pt, av.pt, rl.pt    trainable tensors + optimizer + step            (stages ar, av, rl)
    WORK/refit.jsonl, refit.pt  the final AV's explanations of training rows, the AR refit on them (refit)
    WORK/losses.jsonl           one line per training step of every stage
    OUT/av, OUT/ar              the pair in the released layout                  (stage export)
    OUT/eval.json               held-out evaluation                             (stage eval)

A stage whose output is complete is skipped; a training stage continues from its last saved step
(raise its step count to train on). ``calibrate`` writes the FVE baseline into OUT's sidecars.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import cached_property
from pathlib import Path

import torch

from nla_serve.train.config import STAGES, TrainConfig
from nla_serve.train.corpus import Document, parse_source, text_sources_documents
from nla_serve.model_folder import resolve_device
from nla_serve.train.loop import LossLog, load_state, load_trainable

DEFAULT_CHATS = 200

# later training outputs and the saved states they started from: once one of those states trains on
# (a raised --ar-steps, say), the later output is stale, and layering it on top would silently
# discard the new training, so it is refused (``Pipeline.check_inputs``)
DERIVED = {"rl.pt": ("ar.pt", "av.pt"), "refit.jsonl": ("av.pt", "rl.pt"), "refit.pt": ("ar.pt", "av.pt", "rl.pt")}


def written_lines(path: Path) -> int:
    """Documents already written to a resumable jsonl (0 when it does not exist)."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


class Pipeline:
    def __init__(self, cfg: TrainConfig):
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        self.cfg = cfg
        self.work = Path(cfg.work)
        self.device = resolve_device(cfg.device)
        self.log = LossLog(self.work / "losses.jsonl")
        if not cfg.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    def run(self) -> dict:
        self.cfg.check_resume()
        done = {}
        for stage in STAGES:
            if stage in self.cfg.stages:
                t0 = time.time()
                done[stage] = getattr(self, f"stage_{stage}")()
                done[stage]["seconds"] = round(time.time() - t0, 2)
                with open(self.work / "stages.jsonl", "a") as f:
                    f.write(json.dumps({"stage": stage, **done[stage]}, default=str) + "\n")
        return done

    # -- shared inputs ----------------------------------------------------------------------

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.cfg.target)

    def documents(self) -> list[Document]:
        path = self.work / "corpus.jsonl"
        if not (self.work / ".corpus.complete").is_file():
            self.stage_corpus()
        docs = [Document.from_json(line) for line in path.read_text().splitlines()]
        for name in ("chats.jsonl", "genres.jsonl"):
            if (self.work / name).is_file():
                docs += [Document.from_json(line) for line in (self.work / name).read_text().splitlines()]
        return docs

    @cached_property
    def acts(self):
        from nla_serve.train.activations import load_activations

        if not (self.work / "activations" / ".complete").is_file():
            self.stage_collect()
        return load_activations(self.work / "activations")

    @cached_property
    def targets(self) -> list[dict]:
        path = self.work / "targets.jsonl"
        if not path.is_file():
            self.stage_targets()
        return [json.loads(line) for line in path.read_text().splitlines()]

    def train_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.acts.records) if r["split"] == "train"]

    @cached_property
    def pair(self) -> dict:
        """Marker and injection scale: chosen once, then read back (they shape every AV input)."""
        from nla_serve.train.export import choose_marker

        path = self.work / "pair.json"
        if path.is_file():
            return json.loads(path.read_text())
        rows = self.train_rows()
        scale = self.cfg.injection_scale or float(self.acts.vectors[rows].norm(dim=-1).median())
        pair = {"marker": choose_marker(self.tokenizer, self.cfg.av_template, self.cfg.marker),
                "injection_scale": round(scale, 4),
                "injection_scale_source": "configured" if self.cfg.injection_scale else
                "median layer-K norm of the training activations"}
        path.write_text(json.dumps(pair, indent=2, ensure_ascii=False))
        return pair

    def prompt(self) -> tuple[list[int], int]:
        from nla_serve.nla.sidecar import canonical_av_ids

        ids = canonical_av_ids(self.tokenizer, self.cfg.av_template, self.pair["marker"])
        return ids, ids.index(self.tokenizer.encode(self.pair["marker"], add_special_tokens=False)[0])

    @property
    def eos_ids(self) -> set[int]:
        from nla_serve.model_folder import eos_ids_of

        return eos_ids_of(self.cfg.target, self.tokenizer)

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else min(self.eos_ids)

    def check_inputs(self, output: str) -> None:
        """Record the steps of ``output``'s input states (``DERIVED``) when it is first made; refuse
        to use an existing ``output`` once one of them has moved on."""
        path, now = self.work / "inputs.json", {}
        for name in DERIVED[output]:
            state = load_state(self.work / name)
            now[name] = int(state["step"]) if state is not None else None
        book = json.loads(path.read_text()) if path.is_file() else {}
        if (self.work / output).exists() and output in book:
            if book[output] != now:
                later = list(DERIVED)[list(DERIVED).index(output):]  # DERIVED is in stage order
                raise ValueError(f"{self.work / output} was made from {book[output]}, but those states are now "
                                 f"at {now}; delete {', '.join(later)} in {self.work} to redo those stages "
                                 "from the new states")
            return
        book[output] = now
        path.write_text(json.dumps(book, indent=2))

    def build_ar(self, final: bool, refit: bool = True):
        """The AR after stage ``ar`` (final=False), or after every stage that trains it (ar, rl's AR
        updates, then refit unless ``refit`` is False)."""
        from nla_serve.train.models import build_ar

        ar = build_ar(self.cfg.target, self.cfg.layer, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha,
                      device=self.device)
        states = [(self.work / "ar.pt", "model")]
        if final:
            states += [(self.work / "rl.pt", "ar")] + ([(self.work / "refit.pt", "model")] if refit else [])
        for path, key in states:
            state = load_state(path)
            if state is not None:
                if path.name in DERIVED:
                    self.check_inputs(path.name)
                load_trainable(ar, state[key])
        return ar.eval()

    def build_av(self, final: bool):
        from nla_serve.train.models import build_av

        av = build_av(self.cfg.target, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, device=self.device)
        for path, key in ((self.work / "av.pt", "model"), (self.work / "rl.pt", "av")):
            state = load_state(path) if (final or key == "model") else None
            if state is not None:
                if path.name in DERIVED:
                    self.check_inputs(path.name)
                load_trainable(av, state[key])
        return av.eval()

    # -- stages ----------------------------------------------------------------------------

    def stage_corpus(self) -> dict:
        from nla_serve.train.chats import generate_chats

        cfg, path = self.cfg, self.work / "corpus.jsonl"
        if not (self.work / ".corpus.complete").is_file():
            docs = list(text_sources_documents(list(cfg.sources), cfg.docs_per_source))
            path.write_text("".join(d.to_json() + "\n" for d in docs))
            (self.work / ".corpus.complete").write_text(str(len(docs)))
        from nla_serve.train.genres import generate_genres

        n = {"chat": 0, "genres": 0}
        for spec in cfg.sources:
            name, arg = parse_source(spec)
            if name in n:
                n[name] += int(arg) if arg else DEFAULT_CHATS
        writer = None
        if written_lines(self.work / "chats.jsonl") < n["chat"] or written_lines(self.work / "genres.jsonl") < n["genres"]:
            # one engine writes both (a vLLM engine takes ~30 s to start); none when all is written
            from nla_serve.train.writer import TextWriter

            writer = TextWriter.open(cfg.target, self.tokenizer, device=self.device, engine=cfg.writer_engine,
                                     seed=cfg.seed, batch_size=cfg.chat_batch)
        if n["chat"]:
            generate_chats(cfg.target, self.work / "chats.jsonl", n["chat"], max_new_tokens=cfg.chat_max_tokens,
                           seed=cfg.seed, progress=cfg.progress, writer=writer)
        if n["genres"]:
            generate_genres(cfg.target, self.work / "genres.jsonl", n["genres"], max_new_tokens=cfg.genre_max_tokens,
                            seed=cfg.seed, progress=cfg.progress, writer=writer)
        if writer is not None:
            writer.close()
        return {"documents": int((self.work / ".corpus.complete").read_text()), "chats": n["chat"],
                "genres": n["genres"]}

    def stage_collect(self) -> dict:
        from nla_serve.train.activations import collect

        cfg = self.cfg
        acts = collect(cfg.target, self.documents(), cfg.layer, self.work / "activations",
                       context_tokens=cfg.context_tokens, positions_per_doc=cfg.positions_per_doc,
                       min_position=cfg.min_position, heldout_fraction=cfg.heldout_fraction, device=self.device,
                       seed=cfg.seed, progress=cfg.progress)
        self.__dict__["acts"] = acts
        return {"activations": len(acts), "heldout": sum(r["split"] == "heldout" for r in acts.records)}

    def stage_targets(self) -> dict:
        from nla_serve.train.targets import explanation_body, tagged

        path = self.work / "targets.jsonl"
        if not path.is_file():
            if self.cfg.targets_url:
                rows = self.remote_targets()
            else:
                rows = []
                for i, rec in enumerate(self.acts.records):
                    body = explanation_body(self.tokenizer, rec, previous_token=self.cfg.previous_token,
                                            next_token=self.cfg.next_token, quote_words=self.cfg.quote_words,
                                            quote_predictions=self.cfg.quote_predictions)
                    rows.append({"i": i, "body": body, "text": tagged(body)})
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            tmp.replace(path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        lens = [len(self.tokenizer.encode(r["body"], add_special_tokens=False)) for r in rows[:500]]
        stats = {"targets": len(rows), "mean_tokens": round(statistics.fmean(lens), 1) if lens else 0,
                 "share_30_80": round(sum(30 <= n <= 80 for n in lens) / max(1, len(lens)), 3),
                 "writer": rows[0].get("writer", "built from the text") if rows else None}
        stats |= self.targets_grounding(rows[:500])
        (self.work / "targets.json").write_text(json.dumps(stats, indent=2))
        return stats

    def remote_targets(self) -> list[dict]:
        """Every activation's target from ``--targets-url``, resumable through targets.remote.jsonl."""
        from nla_serve.train.remote_targets import TargetWriter, WriterSettings, api_key_from_env

        cfg = self.cfg
        if not cfg.targets_model:
            raise ValueError("--targets-url needs --targets-model (the model name to ask there)")
        part = self.work / "targets.remote.jsonl"
        writer = TargetWriter(WriterSettings(cfg.targets_url, cfg.targets_model, api_key_from_env(),
                                             concurrency=cfg.targets_concurrency,
                                             max_tokens=cfg.targets_max_tokens), self.tokenizer)
        writer.write_all(list(enumerate(self.acts.records)), part, progress=cfg.progress)
        by_row = {}
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn line, rewritten after it
            by_row[row["i"]] = row
        return [by_row[i] for i in range(len(self.acts.records))]

    def targets_grounding(self, rows: list[dict]) -> dict:
        """How much of what the targets quote is in the text their activation saw, or among its
        predictions (explain/grounding.py): targets that quote the unseen teach the AV to invent."""
        from nla_serve.train.evaluate import grounding_of

        found = quotes = 0
        for r in rows:
            g = grounding_of(self.tokenizer, self.acts.records[r["i"]], r["body"])
            quotes += g.quotes
            found += len(g.found) + len(g.predicted)
        return {"quotes": quotes, "quotes_grounded": round(found / quotes, 3) if quotes else None}

    def stage_ar(self) -> dict:
        from nla_serve.train.sft import train_ar

        cfg, rows = self.cfg, self.train_rows()
        ar = self.build_ar(final=False)
        if load_state(self.work / "ar.pt") is None:
            ar.init_head(self.acts.vectors[rows].mean(dim=0).to(self.device))
        train_ar(ar, self.tokenizer, cfg.ar_template, [self.targets[i]["body"] for i in rows], self.acts.vectors[rows],
                 steps=cfg.ar_steps, batch=cfg.ar_batch, lr=cfg.ar_lr, seed=cfg.seed, state_path=self.work / "ar.pt",
                 log=self.log, device=self.device, dtype=cfg.dtype, save_every=cfg.save_every,
                 progress=cfg.progress)
        return self.losses("ar")

    def stage_av(self) -> dict:
        from nla_serve.train.sft import train_av

        cfg, rows, tok = self.cfg, self.train_rows(), self.tokenizer
        end = tok.eos_token_id if tok.eos_token_id is not None else min(self.eos_ids)
        targets = [tok.encode(self.targets[i]["text"], add_special_tokens=False) + [end] for i in rows]
        ids, at = self.prompt()
        av = self.build_av(final=False)
        train_av(av, ids, at, self.pair["injection_scale"], targets, self.acts.vectors[rows], pad_id=self.pad_id,
                 steps=cfg.av_steps, batch=cfg.av_batch, lr=cfg.av_lr, seed=cfg.seed, state_path=self.work / "av.pt",
                 log=self.log, device=self.device, dtype=cfg.dtype, save_every=cfg.save_every,
                 progress=cfg.progress)
        return self.losses("av")

    def stage_rl(self) -> dict:
        from nla_serve.train.rl import train_rl

        cfg = self.cfg
        if cfg.rl_steps <= 0:
            return {"skipped": "rl_steps is 0"}
        self.check_inputs("rl.pt")
        rows = self.train_rows()
        ids, at = self.prompt()
        av, ar = self.build_av(final=False), self.build_ar(final=False)
        train_rl(av, ar, self.tokenizer, self.tokenizer, ids, at, self.pair["injection_scale"], cfg.ar_template,
                 self.acts.vectors[rows], eos_ids=self.eos_ids, pad_id=self.pad_id, steps=cfg.rl_steps,
                 batch=cfg.rl_batch, group=cfg.rl_group, lr=cfg.rl_lr, ar_lr=cfg.rl_ar_lr,
                 temperature=cfg.rl_temperature, max_new_tokens=cfg.rl_max_new_tokens,
                 truncation_penalty=cfg.rl_truncation_penalty, seed=cfg.seed, state_path=self.work / "rl.pt",
                 log=self.log, device=self.device, dtype=cfg.dtype, save_every=max(1, cfg.save_every // 5),
                 progress=cfg.progress)
        return self.losses("rl", key="reward")

    def stage_refit(self) -> dict:
        from nla_serve.train.evaluate import stratified
        from nla_serve.train.refit import explain_rows
        from nla_serve.train.sft import train_ar

        cfg = self.cfg
        if cfg.refit_rows <= 0 or cfg.refit_steps <= 0:
            return {"skipped": "refit_rows or refit_steps is 0"}
        train = self.train_rows()
        rows = [train[i] for i in stratified([self.acts.records[i] for i in train], cfg.refit_rows, cfg.seed + 3)]
        vectors = self.acts.vectors[rows]
        for output in DERIVED:  # rl.pt first: a stale RL is the cause to name, not its stale refit
            self.check_inputs(output)
        ids, at = self.prompt()
        av = self.build_av(final=True)
        bodies = explain_rows(av, self.tokenizer, ids, at, self.pair["injection_scale"], rows, vectors,
                              self.work / "refit.jsonl", eos_ids=self.eos_ids, max_new_tokens=cfg.refit_max_tokens,
                              batch=cfg.refit_gen_batch, progress=cfg.progress)
        del av
        ar = self.build_ar(final=True, refit=False)
        train_ar(ar, self.tokenizer, cfg.ar_template, bodies, vectors, steps=cfg.refit_steps, batch=cfg.ar_batch,
                 lr=cfg.refit_lr, seed=cfg.seed + 4, state_path=self.work / "refit.pt", log=self.log,
                 device=self.device, dtype=cfg.dtype, save_every=cfg.save_every, progress=cfg.progress,
                 stage="refit")
        return {"rows": len(rows), **self.losses("refit")}

    def stage_export(self) -> dict:
        from nla_serve.train.export import export_pair

        cfg = self.cfg
        av, ar = self.build_av(final=True), self.build_ar(final=True)
        av_dir, ar_dir = export_pair(
            av, ar, cfg.target, self.tokenizer, cfg.out_dir, layer=cfg.layer,
            injection_scale=self.pair["injection_scale"], av_template=cfg.av_template, ar_template=cfg.ar_template,
            marker=self.pair["marker"], lora=cfg.lora_rank > 0, adapter_dtype=cfg.adapter_dtype,
            extra={"injection_scale_source": self.pair["injection_scale_source"],
                   "training": {k: getattr(cfg, k) for k in ("lora_rank", "lora_alpha", "ar_steps", "av_steps",
                                                             "rl_steps", "refit_rows", "refit_steps", "sources",
                                                             "seed")}})
        return {"av": str(av_dir), "ar": str(ar_dir)}

    def stage_calibrate(self) -> dict:
        from nla_serve.train.calibrate import calibrate

        held = self.acts.split("heldout")
        vecs = held.vectors[: self.cfg.calibrate_n]
        out = self.cfg.out_dir
        baseline = calibrate(out / "av", out / "ar", vecs,
                             measured_on=f"{len(vecs)} held-out activations of {','.join(self.cfg.sources)}")
        return {"fve_baseline": baseline, "n": len(vecs)}

    def stage_eval(self) -> dict:
        from nla_serve.train.evaluate import evaluate, write_report

        cfg, out = self.cfg, self.cfg.out_dir

        def run(split: str) -> dict:
            return evaluate(out / "av", out / "ar", self.acts.split(split), n=cfg.eval_n, device=self.device,
                            max_tokens=cfg.eval_max_tokens, seed=cfg.seed, base=cfg.target,
                            cache_dir=self.work / "merged")

        # top level: documents held out of seen genres; "unseen": genres and topics never trained on
        report = run("heldout")
        if any(r["split"] == "unseen" for r in self.acts.records):
            report["unseen"] = run("unseen")
        write_report(report, out / "eval.json")
        keys = ("n", "fve", "shuffled", "grounding", "truncated_share", "mean_tokens")
        return {k: report[k] for k in keys} | (
            {"unseen": {k: report["unseen"][k] for k in keys}} if "unseen" in report else {})

    def losses(self, stage: str, key: str = "loss") -> dict:
        rows = [r[key] for r in self.log.read(stage)]
        k = max(1, len(rows) // 10)
        return {"steps": len(rows), f"first_{key}": statistics.fmean(rows[:k]) if rows else None,
                f"last_{key}": statistics.fmean(rows[-k:]) if rows else None}


def run_training(cfg: TrainConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return Pipeline(cfg).run()
