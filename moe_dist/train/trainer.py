"""One fine-tuning run, in the order it happens: model -> data -> engine -> (resume) ->
evaluate -> train steps (log, method decision, rebalance, evaluate, checkpoint) -> evaluate ->
summary.

The trainer runs any method through the protocol in moe_dist/methods/base.py and names none;
every structure change goes through moe_dist/train/structure.py. Everything rank-dependent is
explicit (rank, world, EP size); every collective is taken by all ranks in the same order
(evaluation, routing stats, decisions, checkpoints are collectives).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.config import RunConfig
from moe_dist.methods import Change, RunInfo, method_class
from moe_dist.models.arch import shape_summary
from moe_dist.models.convert import adapter_params
from moe_dist.parallel import ds_comm
from moe_dist.parallel.agreement import agree_on_plan
from moe_dist.parallel.elastic import elastic_launch, resolve_ep_size
from moe_dist.parallel.groups import writes_canonical_copy
from moe_dist.parallel.move import MoveReport, current_placements
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.kernels.packed_attention import flatten_packed_rows
from moe_dist.parallel.reduce import all_reduce, global_sum
from moe_dist.plan import AdapterPlan
from moe_dist.routing import RoutingStats, collect_routing_stats, experts_modules
from moe_dist.train import checkpoint as ckpt
from moe_dist.train import zero_state
from moe_dist.train.engine import build_engine
from moe_dist.train.evaluate import exact_match, token_loss
from moe_dist.train.guard import Guard, arm_overflow_check, inject_nan
from moe_dist.train.memory import StepMemory
from moe_dist.train.metrics import MetricsLogger
from moe_dist.train.rebalance import Rebalancer, expert_imbalance
from moe_dist.train.report import format_summary, run_summary
from moe_dist.train.resume import batch_layout, check_resume_config, scale_schedule, with_saved_global_batch
from moe_dist.train.setup import build_model, check_tokenizer, load_data, profile_routing, resolve_model_path
from moe_dist.train.stop import Preempted, StopRequests
from moe_dist.train.structure import Engine, change_structure, start_engine


class Trainer:
    def __init__(self, cfg: RunConfig, device: torch.device, bf16: bool, stop: StopRequests | None = None,
                 ep_size: int | None = None):
        """`ep_size`: as launch/train.py resolved it (with the model's expert count); `cfg` is
        taken with the global batch split for this world (resume.batch_layout)."""
        self.device, self.bf16 = device, bf16
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.ep_size = ep_size or resolve_ep_size(cfg.ep_size, self.world, None)[0]
        self.is_main = self.rank == 0
        self.resume_from = ckpt.agreed_resume_path(cfg.checkpoint.resume, cfg.output_dir, self.log)
        self.saved = ckpt.read_trainer_state(self.resume_from) if self.resume_from is not None else None
        self.cfg = cfg = batch_layout(cfg, self.world, self.saved, elastic_launch())
        self.lr_factor = (check_resume_config(with_saved_global_batch(self.saved), cfg, self.resume_from)
                          if self.saved else 1.0)
        self.step = self.saved["step"] if self.saved else 0
        self.stop = stop or StopRequests(self.rank, cfg.faults.preempt_grace_s)  # (installed by launch/train.py)
        self.guard = Guard(cfg.faults.max_nonfinite_steps, cfg.faults.stall_steps, device)
        self.last_loss = float("nan")  # the job's mean loss of the last logged step (recorded with checkpoints)
        self.stop_now = False  # a stop request reached every rank with this step's flags
        self.resume_reported = False
        self.method = method_class(cfg.method)(cfg)
        self.rebalancer = Rebalancer(cfg, self.ep_size)
        self.routing_total: RoutingStats | None = None  # summed over the run (every log step)
        self.logger = MetricsLogger(cfg.output_dir, self.is_main, cfg.train.steps, self.step)

    def log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def event(self, text: str) -> None:
        self.logger.event(self.step, text)
        self.logger.print(text)

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.cfg
        self.model_dir = resolve_model_path(cfg)
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        check_tokenizer(self.tokenizer, self.model_dir)
        self._setup_data()
        placements = None
        if self.saved is not None:
            self.plan = AdapterPlan.from_json((self.resume_from / "plan.json").read_text())
            self.routing_total = ckpt.load_routing(self.resume_from)  # the run's routing so far
            placements = self._resume_placements()
        else:
            placements = self._start_plan()
        self.model = build_model(cfg, self.model_dir, self.plan, self.ep_size, self.device, self.bf16, placements)
        snap = None
        if self.saved is not None:
            snap = ckpt.load_engine_snapshot(self.resume_from, adapter_params(self.model))
            if self.lr_factor != 1.0:  # train.lr given anew: the new peak, the schedule's position kept
                snap = dataclasses.replace(snap, scheduler=scale_schedule(
                    snap.scheduler, [self.lr_factor] * len(snap.scheduler["base_lrs"])))
                self.log(f"train.lr {self.cfg.train.lr:g}: resumed schedule scaled x{self.lr_factor:g}")
            ckpt.load_masks(self.resume_from, self.lori_masks())
            self.method.load_state_dict(self.saved.get("method_state") or {})
            self.rebalancer.load_state_dict(self.saved.get("rebalance") or {})
            self.guard.nonfinite_total = self.saved.get("skipped_steps", 0)
            self.last_loss = self.saved.get("loss") if self.saved.get("loss") is not None else float("nan")
            self.log(f"resuming from {self.resume_from} (step {self.step}, saved by world {self.saved['world_size']} "
                     f"EP {self.saved['ep_size']}): {len(snap.values)} adapter tensors loaded on rank {self.rank}")
        self.method.prepare(self.model, self.step)
        # What exists now (model, tokenizer, data, imported libraries) lives for the whole run:
        # freezing it out of the cycle collector makes the full collection that frees an old
        # engine at a structure change scan only what came after (0.3 s -> a few ms here).
        gc.collect()
        gc.freeze()
        ds_comm.install()  # ZeRO's collectives over shared memory where the ranks share a host (CPU)
        self.ds: Engine = start_engine(self.model, self.build_engine, snap)
        if self.saved is not None:
            self.batches.load_state_dict(self.saved["data"])
            if not ckpt.load_rng_state(self.resume_from):
                torch.manual_seed(cfg.seed + self.step)
        self.trainable_total = self.count_trainable()

    def build_engine(self, model: torch.nn.Module):
        engine, scheduler = build_engine(model, self.cfg, self.bf16)
        arm_overflow_check(engine)  # a non-finite gradient skips the step on every rank, fp32 too
        return engine, scheduler

    def _start_plan(self) -> dict[int, ExpertPlacement] | None:
        """The method's initial plan (agreed by every rank) and, when it was chosen from routing
        counts, the placements that balance it (built in place: nothing moves)."""
        run = RunInfo(self.cfg, self.hf_config, self.ep_size, lambda plan, n: profile_routing(
            self.cfg, self.model_dir, plan, self.ep_size, self.device, self.bf16, self.batches, n))
        start = self.method.initial_plan(run)
        agree_on_plan(start.plan, f"{self.cfg.method} initial plan")
        self.plan = start.plan
        if start.summary:
            self.event(start.summary)
        balanced = self.rebalancer.initial(start.plan, start.routing, self.hf_config) if start.routing else None
        if balanced is None:
            return None
        placements, report = balanced
        self.record_move(f"{self.cfg.method} placement (built in place, nothing moved)", report, placements)
        return placements

    def _resume_placements(self) -> dict[int, ExpertPlacement] | None:
        """At the saved EP size the saved placement; at another (an elastic restart, a resume
        by hand), the placement that balances the routing the checkpoint measured, built in
        place (the repartitioner's policy); without routing, contiguous."""
        saved = self.saved
        if saved.get("placements") and saved["ep_size"] == self.ep_size:
            return {int(l): ExpertPlacement(tuple(o), self.ep_size) for l, o in saved["placements"].items()}
        balanced = (self.rebalancer.initial(self.plan, self.routing_total, self.hf_config)
                    if self.routing_total is not None else None)
        if balanced is None:
            return None
        placements, report = balanced
        self.record_move(f"resume at EP {self.ep_size} (saved at EP {saved['ep_size']}): balanced from the "
                         "checkpoint's routing (built in place)", report, placements)
        return placements

    def _setup_data(self) -> None:
        self.batches, self.eval_set = load_data(self.cfg, self.tokenizer, self.model_dir, self.rank, self.world,
                                                self.log)

    def count_trainable(self) -> int:
        """Collective: trainable parameters of the whole job, each EP shard counted once."""
        return int(global_sum(sum(p.numel() for p in self.ds.params.values() if writes_canonical_copy(p)),
                              self.device))

    def lori_masks(self) -> dict[str, torch.Tensor]:
        return {k: m for mod in experts_modules(self.model).values() for k, m in mod.adapters.lori_masks().items()}

    # ---- pieces of a step -------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Collective: the held-out split's token loss and / or exact match (eval.metrics)."""
        e, module, result = self.eval_set, self.ds.engine.module, {}
        if e is None:
            return None
        if e.loss_rows is not None:
            result.update(token_loss(module, e.loss_rows, self.cfg.train.micro_batch, self.device))
        if e.prompts is not None:
            result.update(exact_match(module, self.tokenizer, e.prompts, e.references, self.cfg.eval.max_new_tokens,
                                      self.cfg.eval.batch_size, self.device))
        return result

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (this rank)."""
        engine, losses = self.ds.engine, []
        for _ in range(self.cfg.train.grad_accum):
            batch = flatten_packed_rows({k: v.to(self.device) for k, v in self.batches.next_batch().items()},
                                        self.model.config._attn_implementation)
            loss = inject_nan(engine(**batch, use_cache=False).loss, self.rank, self.step + 1)
            extra = self.method.extra_loss(self.model)
            engine.backward(loss if extra is None else loss + extra)
            engine.step()
            losses.append(loss.detach())
        fail_at = os.environ.get("MOE_DIST_FAIL_AT")  # "rank:step": a test hook for crash handling
        if fail_at and fail_at == f"{self.rank}:{self.step + 1}":
            raise RuntimeError(f"injected failure (MOE_DIST_FAIL_AT={fail_at})")
        time.sleep(float(os.environ.get("MOE_DIST_STEP_PAUSE_S", "0")))  # a test hook: steps slow enough to fault
        return torch.stack(losses).mean().item()

    def after_step(self, loss: float) -> None:
        """Collective: the job's verdict on this step (one all-reduce): a non-finite step was
        skipped by every rank, too many in a row stop the run; a stall is reported."""
        health = self.guard.check(loss, self.ds.engine.was_step_applied(), self.stop.requested)
        self.stop_now = health.stop
        self.guard.report(self.step, health, loss, float(self.ds.engine.get_global_grad_norm() or 0.0), self.logger,
                          self.cfg)

    def collect_routing(self) -> RoutingStats:
        """Collective: drain the model's counters into the run total, the method and the rebalancer."""
        stats = collect_routing_stats(self.model)
        self.routing_total = stats if self.routing_total is None else self.routing_total + stats
        self.method.observe(stats)
        self.rebalancer.observe(stats)
        return stats

    def decide(self) -> None:
        """Collective: the method's decision due at this step, if any, then the placement's."""
        if self.method.decides_at(self.step):
            self.collect_routing()
            change = self.method.decide(self.step, self.model, self.plan)
            if change is not None:
                self.apply(change, f"{self.cfg.method} step {self.step}")
            self.method.prepare(self.model, self.step)
        if self.rebalancer.due(self.step, self.model):
            self.collect_routing()
            placements, now, after, why = self.rebalancer.decide(self.step, self.model, self.plan)
            if placements is not None:
                self.apply(Change(placements=placements), why, (now, after))

    def apply(self, change: Change, why: str, imbalance: tuple[float, float] | None = None) -> None:
        """Collective: agree on the change's plan, add the placements that balance it, apply it
        through the one structure-change path, log what happened."""
        if change.plan is not None:
            agree_on_plan(change.plan, f"{self.cfg.method} plan at step {self.step}")
            if change.routing is not None and change.plan != self.plan:
                placements, now, after = self.rebalancer.for_plan(self.model, change.plan, change.routing)
                if placements is not None:
                    change, imbalance = dataclasses.replace(change, placements=placements), (now, after)
        if not change.applies_to(self.plan):
            if change.summary:
                self.event(change.summary)
            return
        self.ds, report = change_structure(self.model, self.ds, change, self.build_engine)
        plan_changed = self.model.moe_dist_info.plan != self.plan
        self.plan = self.model.moe_dist_info.plan
        if plan_changed:
            self.trainable_total = self.count_trainable()
            self.log_plan()
        if report.move is not None:
            report.move.imbalance_before, report.move.imbalance_after = imbalance or (1.0, 1.0)
            self.record_move(why, report.move, current_placements(experts_modules(self.model)))
        if change.summary:
            self.event(f"{change.summary}; {report.line()}")

    def log_plan(self) -> None:
        mods = experts_modules(self.model)
        self.logger.plan(self.step, self.plan, sorted(mods), max((m.num_experts for m in mods.values()), default=0))

    def record_move(self, why: str, report: MoveReport, placements: dict[int, ExpertPlacement]) -> None:
        self.logger.record(self.step, "repartition", {
            "imbalance_before": report.imbalance_before, "imbalance_after": report.imbalance_after,
            "experts_moved": report.experts_moved, "bytes_moved": report.bytes_moved, "seconds": report.seconds},
            {"reason": why, "placements": {str(l): list(p.owner) for l, p in placements.items()}})
        self.logger.print(f"{why}: {report.line()}")

    def save(self) -> Path | None:
        """Collective. Each owner gives its own state: engine (snapshot), data, method, trainer.
        Nothing is written from a non-finite state (a skipped step, a non-finite value)."""
        self.collect_routing()  # counts since the last read go to their owners' windows first
        params = adapter_params(self.model)
        snap = zero_state.snapshot(self.ds.engine, self.ds.scheduler, params)
        # (a skipped step leaves the state as it was: only non-finite values stop a save)
        bad = torch.tensor([float(not all(torch.isfinite(v).all() for v in (*snap.values.values(),
                                                                             *snap.optim.values())))],
                           device=self.device)
        all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            self.logger.print(f"step {self.step}: not saving a checkpoint: the state is not finite")
            return None
        owners = {"data": self.batches.state_dict(), "method_state": self.method.state_dict(), "loss": self.last_loss,
                  "skipped_steps": self.guard.nonfinite_total, "rebalance": self.rebalancer.state_dict(),
                  "ep_size": self.ep_size, "method": self.cfg.method,
                  "placements": {str(l): list(p.owner) for l, p in current_placements(experts_modules(self.model)).items()},
                  "config": dataclasses.asdict(self.cfg),
                  # where the base came from and its shape: export finds and checks its base by these
                  "model_dir": str(Path(self.model_dir).resolve()), "base_shape": shape_summary(self.hf_config)}
        writes = {k for k, p in params.items() if writes_canonical_copy(p)}
        return ckpt.save_checkpoint(self.cfg.output_dir, self.step, snap, writes, self.plan.to_json(), owners,
                                    self._routing_tensors(), self.cfg.checkpoint.keep, self.lori_masks())

    def _routing_tensors(self) -> dict[str, torch.Tensor]:
        r = self.routing_total
        return {} if r is None else {"tokens_LE": r.tokens_LE, "mass_LE": r.mass_LE,
                                     "layers": torch.tensor(r.layers, device="cpu")}

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, logger = self.cfg, self.logger
        tokens_per_step = cfg.train.micro_batch * cfg.data.seq_len * cfg.train.grad_accum * self.world
        self.log(f"model {cfg.model} ({self.hf_config.model_type}), world {self.world}, EP {self.ep_size}, "
                 f"method {cfg.method}, trainable params {self.trainable_total:,}, logs in {cfg.output_dir}")
        before = self.evaluate() if cfg.eval.before and self.step == 0 else None
        if before:
            logger.eval(self.step, before)
        losses, times, self.step_ends = [], [], []  # step_ends: wall clock at each step's end (bench/e2e.py)
        t_log, steps_since_log = time.perf_counter(), 0
        t_run, figures = t_log, None
        collect_routing_stats(self.model)  # reset counters touched by evaluation
        self.log_plan()
        self.memory = StepMemory(self.device)  # from the end of the first step: lazy optimizer state is not a step's
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.step += 1
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            if len(losses) == 1:
                self.memory.start()
            steps_since_log += 1
            logger.advance()
            self.after_step(loss)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                stats = self.collect_routing()
                elapsed = time.perf_counter() - t_log
                mean_loss = global_sum(sum(losses[-steps_since_log:]) / steps_since_log, self.device) / self.world
                self.last_loss = mean_loss
                if self.saved is not None and not self.resume_reported:  # (before the step's own line)
                    self.report_resume(stats)
                logger.step(self.step, {"loss": mean_loss, "lr": self.ds.scheduler.get_last_lr()[0],
                                        "grad_norm": float(self.ds.engine.get_global_grad_norm() or 0.0),
                                        "tokens_per_sec": tokens_per_step * steps_since_log / elapsed,
                                        "trainable_params": self.trainable_total,
                                        "sequences": cfg.train.global_batch, "world": self.world})
                figures = stats  # the latest window's routing, drawn every figures_every steps and at the end
                if cfg.train.figures_every and self.step % cfg.train.figures_every == 0:
                    logger.routing(self.step, stats)
                    figures = None
                t_log, steps_since_log = time.perf_counter(), 0
            self.decide()  # (part of the step: a resume starts after it)
            if self.stop_now:  # every rank, this step: checkpoint and go, no evaluation
                self.preempt()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                logger.eval(self.step, self.evaluate())
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                logger.print(f"checkpoint {self.save()}")
            self.step_ends.append(round(time.perf_counter() - t_run, 6))
        if figures is not None:
            logger.routing(self.step, figures)
        after = None if self.stop.requested else self.evaluate()  # a stop arriving now: save first
        if after:
            logger.eval(self.step, after)
        final = self.save()
        if final is None:  # not finite: the newest good one is the run's result
            found = ckpt.complete_checkpoints(ckpt.checkpoint_root(cfg.output_dir))
            final = found[-1][1] if found else None
        logger.close()
        summary = run_summary(self, losses, times, tokens_per_step, before, after, final)
        if self.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            self.log(format_summary(summary))
        return summary

    def report_resume(self, stats: RoutingStats) -> None:
        """Once, at the first logged step after a resume: the world before and after, what the
        restart cost (metrics.py) and the expert balance of this window's routing."""
        self.resume_reported, s, launch = True, self.saved, elastic_launch()
        self.logger.resumed(self.step, s["step"], {
            "world": self.world, "ep_size": self.ep_size, "saved_world": s["world_size"], "saved_ep_size": s["ep_size"],
            "restart": launch.restart if launch else 0,
            "expert_imbalance": expert_imbalance(self.model, self.plan, stats, self.ep_size) or 1.0,
            "expert_imbalance_contiguous": expert_imbalance(self.model, self.plan, stats, self.ep_size, True) or 1.0})

    def preempt(self) -> None:
        """Every rank got the stop with the same step's flags: checkpoint, end the run non-zero."""
        path = self.save()
        self.logger.close()
        where = f"checkpoint {path} written" if path else "no checkpoint written (state not finite)"
        raise Preempted(f"stopped by {self.stop.reason or 'a peer rank'} after step {self.step}: {where}; continue "
                        "with checkpoint.resume=auto (the same command)")
