"""One fine-tuning run, in the order it happens: model -> data -> engine -> (resume) ->
evaluate -> train steps (log, evaluate, checkpoint) -> evaluate -> summary.

Everything rank-dependent is explicit (rank, world, EP size); every collective is taken by
all ranks in the same order (evaluation, routing stats, checkpoints are collectives).
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.adapters.lora import LoRAConfig
from moe_dist.config import RunConfig
from moe_dist.export.base import shape_summary
from moe_dist.data.dataset import RowEncoder, encode_dataset, load_rows
from moe_dist.data.packing import ShardedBatches
from moe_dist.models.arch import UnsupportedModelError, arch_spec, attention_targets, expert_sizes, moe_layer_indices
from moe_dist.models.convert import adapter_params, convert_dense_model, trainable_params
from moe_dist.models.loading import load_model, resolve_checkpoint
from moe_dist.methods.dmep import collect_utilisation, dmep_targets, load_balancing_loss, set_load_balancing
from moe_dist.methods.dmep import initial_plan as dmep_initial_plan
from moe_dist.methods.dmep import prune_plan as dmep_prune_plan
from moe_dist.methods.epng import prune_and_grow
from moe_dist.methods.hellora import hot_experts, hot_plan
from moe_dist.parallel.agreement import agree_on_plan
from moe_dist.parallel.balance import balanced_placements, imbalance, layer_costs
from moe_dist.parallel.groups import writes_canonical_copy
from moe_dist.parallel.placement import ExpertPlacement
from moe_dist.parallel.reduce import global_sum
from moe_dist.plan import AdapterPlan
from moe_dist.routing import collect_routing_stats, decayed_importance, experts_modules
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.engine import build_engine
from moe_dist.train.evaluate import exact_match
from moe_dist.train.metrics import MetricsLogger
from moe_dist.methods.hellori import sparsify_lori
from moe_dist.train.repartition import MoveReport, current_placements, plan_placements, repartition
from moe_dist.train.restructure import rebuild_engine, restructure, teardown

EMBEDDED_TASK = "embedded:arithmetic"


def resolve_model_path(cfg: RunConfig) -> Path:
    """The checkpoint directory; the embedded default is built once (local rank 0) and cached."""
    from moe_dist.models.embedded import DEFAULT_PRETRAIN_STEPS, EMBEDDED_NAME, ensure_embedded_model

    if cfg.model != EMBEDDED_NAME:
        return resolve_checkpoint(cfg.model)
    steps = DEFAULT_PRETRAIN_STEPS if cfg.embedded_pretrain_steps < 0 else cfg.embedded_pretrain_steps
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ensure_embedded_model(cfg.cache_dir, cfg.seed, steps)
    if dist.is_initialized():
        dist.barrier()
    return ensure_embedded_model(cfg.cache_dir, cfg.seed, steps)


def resolve_data_source(source: str, model_dir: Path, cfg: RunConfig, role: str) -> str:
    if source != EMBEDDED_TASK:
        return source
    from moe_dist.models.embedded import embedded_task_files

    return str(embedded_task_files(model_dir)[role])


def load_eval_set(cfg: RunConfig, tokenizer, model_dir: Path, log=print) -> tuple[list, list] | None:
    """(prompt token ids, reference answers) of the held-out split, or None without one."""
    d = cfg.data
    if not d.eval:
        return None
    encoder = RowEncoder(tokenizer, d.prompt_column, d.response_column, d.messages_column)
    rows = load_rows(resolve_data_source(d.eval, model_dir, cfg, "test"), d.eval_split, d.subset)
    if cfg.eval.samples:
        rows = rows.select(range(min(cfg.eval.samples, len(rows))))
    evals, report = encode_dataset(rows, encoder, d.seq_len, d.eval, for_generation=True)
    log(report.line())
    return evals["prompt_ids"], evals["reference"]


def is_moe(hf_config) -> bool:
    try:
        arch_spec(hf_config)
        return True
    except UnsupportedModelError:
        return False


def build_plan(cfg: RunConfig, hf_config) -> AdapterPlan:
    """The method's starting plan: LoRA on every expert projection and on the architecture's
    attention projections (per layer: MLA for DeepSeek, none on linear-attention layers), or
    DMEP's LoRA-MoE modules."""
    moe = is_moe(hf_config)
    names = cfg.lora.attention_target_list()
    if cfg.method == "dmep":
        d = cfg.dmep
        attention = None
        if moe:
            spec = arch_spec(hf_config)
            attention = {layer: [f"{spec.attention_module(layer)}.{p}" for p in projs]
                         for layer, projs in attention_targets(hf_config, names).items()}
        targets = dmep_targets(hf_config.num_hidden_layers, dense=not moe, targets=d.targets, attention=attention)
        return dmep_initial_plan(targets, d.num_experts, cfg.lora.rank, d.top_k)
    num_experts, *_ = expert_sizes(hf_config)
    experts = AdapterPlan.uniform(moe_layer_indices(hf_config), num_experts, cfg.lora.rank,
                                  expert_projections=cfg.lora.expert_target_list())
    attention = attention_targets(hf_config, names) if cfg.lora.attention else {}
    return AdapterPlan(expert_ranks=experts.expert_ranks,
                       attention_ranks={(layer, p): cfg.lora.rank for layer, projs in attention.items() for p in projs})


def build_model(cfg: RunConfig, model_dir: Path, plan: AdapterPlan, ep_size: int, device: torch.device,
                bf16: bool, placements: dict[int, ExpertPlacement] | None = None) -> torch.nn.Module:
    """The converted model: frozen base (bf16 on GPU, fp32 on CPU) + fp32 adapters from `plan`."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    lora = LoRAConfig(alpha=cfg.lora.alpha, rslora=cfg.lora.rslora, seed=cfg.seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_moe(AutoConfig.from_pretrained(model_dir)):  # a dense model: DMEP only, plain data parallel
        if ep_size != 1:
            raise ValueError(f"{model_dir} is a dense model: expert parallelism needs ep_size=1, got {ep_size}")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        model = convert_dense_model(model, plan, lora, device)
    else:
        model = load_model(str(model_dir), plan, ep_size=ep_size, placements=placements, dtype=dtype, device=device,
                           lora=lora)
    model.config.use_cache = False
    return model


class Trainer:
    def __init__(self, cfg: RunConfig, device: torch.device, bf16: bool):
        self.cfg, self.device, self.bf16 = cfg, device, bf16
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.ep_size = cfg.ep_size or self.world
        self.is_main = self.rank == 0
        self.resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.output_dir)
        self.step = 0
        self.routing_total = None  # RoutingStats summed over the run (every log step)
        self.pending_events: list[str] = []  # structure changes to log once the logger exists
        self.routing_window = None  # RoutingStats since the method's last decision
        self.importance_LE = None  # EPnG's decayed importance
        self.routing_balance = None  # RoutingStats since the last placement decision
        self.placements: dict[int, ExpertPlacement] | None = None  # None: contiguous
        self.pending_moves: list[tuple[str, MoveReport]] = []  # placement changes to log

    def log(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        cfg = self.cfg
        self.model_dir = resolve_model_path(cfg)
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._setup_data()
        if self.resume_from is not None:
            self.plan = AdapterPlan.from_json((self.resume_from / "plan.json").read_text())
            state = ckpt.read_trainer_state(self.resume_from)
            if state.get("placements") and state["ep_size"] == self.ep_size:  # same EP size: keep the balance
                self.placements = {int(l): ExpertPlacement(tuple(o), self.ep_size)
                                   for l, o in state["placements"].items()}
        elif cfg.method in ("hellora", "hellori"):
            self.plan = self.profile_hot_plan(lori=cfg.method == "hellori")
        else:
            self.plan = build_plan(cfg, self.hf_config)
        self.model = build_model(cfg, self.model_dir, self.plan, self.ep_size, self.device, self.bf16, self.placements)
        self.params = trainable_params(self.model)
        trainer_state = {}
        if self.resume_from is not None:
            n = ckpt.load_adapter_values(self.resume_from, adapter_params(self.model))
            ckpt.load_masks(self.resume_from, self.lori_masks())
            trainer_state = ckpt.read_trainer_state(self.resume_from)
            self.step = trainer_state["step"]
            if cfg.method == "dmep" and self.dmep_last_prune_passed():
                set_load_balancing(self.model, False)
            if trainer_state.get("importance_LE") is not None:
                self.importance_LE = torch.tensor(trainer_state["importance_LE"], dtype=torch.float64)
            self.log(f"resuming from {self.resume_from} (step {self.step}, saved by world {trainer_state['world_size']} "
                     f"EP {trainer_state['ep_size']}): {n} adapter tensors loaded on rank 0")
        # What exists now (model, tokenizer, data, imported libraries) lives for the whole run:
        # freezing it out of the cycle collector makes the full collection that frees an old
        # engine at a structure change scan only what came after (0.3 s -> a few ms here).
        gc.collect()
        gc.freeze()
        self.engine, self.scheduler = build_engine(self.model, cfg, self.bf16)
        if self.resume_from is not None:
            ckpt.load_engine_state(self.resume_from, self.engine, self.scheduler, self.params)
            self.batches.load_state_dict(trainer_state["data_position"])
            if not ckpt.load_rng_state(self.resume_from):
                torch.manual_seed(cfg.seed + self.step)
        self.trainable_total = self.count_trainable()

    def count_trainable(self) -> int:
        """Collective: trainable parameters of the whole job, each EP shard counted once."""
        return int(global_sum(sum(p.numel() for p in self.params.values() if writes_canonical_copy(p)), self.device))

    def profile_hot_plan(self, lori: bool) -> AdapterPlan:
        """HELLoRA: count routing on `profile_steps` training micro-batches (forward only, with
        the frozen base: attention adapters start at B = 0), then place LoRA on the hot experts.

        The profiled batches are not trained on; the data position goes back to the start."""
        cfg, h = self.cfg, self.cfg.hellora
        base = build_plan(cfg, self.hf_config)
        profile_plan = AdapterPlan(expert_ranks={}, attention_ranks=dict(base.attention_ranks))
        model = build_model(cfg, self.model_dir, profile_plan, self.ep_size, self.device, self.bf16)
        model.train()
        with torch.no_grad():
            for _ in range(h.profile_steps):
                batch = {k: v.to(self.device) for k, v in self.batches.next_batch().items()}
                model(**batch, use_cache=False)
        stats = collect_routing_stats(model)
        del model
        self.batches.load_state_dict({"epoch": 0, "rows_consumed": 0})
        hot = hot_experts(stats.tokens_LE, stats.layers, h.selection, h.top_k, h.coverage)
        plan = hot_plan(base, hot, cfg.lora.rank, lori=lori)
        agree_on_plan(plan, f"{cfg.method} hot-expert plan")
        summary = "; ".join(f"layer {layer}: {experts}" for layer, experts in hot.items())
        self.log(f"hellora: profiled {h.profile_steps} micro-batches per rank; hot experts {summary}")
        self.pending_events.append(f"hellora plan {plan.hash()}: hot experts {summary}")
        if cfg.repartition.enabled and self.ep_size > 1:  # spread the hot experts before building
            _, D, F, _ = expert_sizes(self.hf_config)
            costs = layer_costs(plan, stats.tokens_LE, stats.layers, D, F)
            self.placements = balanced_placements(costs, self.ep_size)
            contiguous = {layer: ExpertPlacement.contiguous(p.num_experts, self.ep_size)
                          for layer, p in self.placements.items()}
            report = MoveReport(imbalance_before=imbalance(costs, contiguous),
                                imbalance_after=imbalance(costs, self.placements))
            self.pending_moves.append(("hellora placement (built in place, nothing moved)", report))
        return plan

    def _setup_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        encoder = RowEncoder(self.tokenizer, d.prompt_column, d.response_column, d.messages_column)
        source = resolve_data_source(d.train, self.model_dir, cfg, "train")
        train, report = encode_dataset(load_rows(source, d.train_split, d.subset), encoder, d.seq_len, d.train)
        self.log(report.line())
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        examples = list(zip(train["input_ids"], train["labels"]))
        self.batches = ShardedBatches(examples, d.seq_len, cfg.train.micro_batch, self.rank, self.world, cfg.seed,
                                      d.packing, pad_id)
        self.eval_set = load_eval_set(cfg, self.tokenizer, self.model_dir, self.log)

    # ---- pieces of a step -------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.eval_set is None:
            return None
        prompts, refs = self.eval_set
        return exact_match(self.engine.module, self.tokenizer, prompts, refs, self.cfg.eval.max_new_tokens,
                           self.cfg.eval.batch_size, self.device)

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (this rank)."""
        losses = []
        for _ in range(self.cfg.train.grad_accum):
            batch = {k: v.to(self.device) for k, v in self.batches.next_batch().items()}
            loss = self.engine(**batch, use_cache=False).loss
            lb = load_balancing_loss(self.model) if self.cfg.method == "dmep" else None  # None once off
            self.engine.backward(loss if lb is None else loss + self.cfg.dmep.lb_coef * lb)
            self.engine.step()
            losses.append(loss.detach())
        fail_at = os.environ.get("MOE_DIST_FAIL_AT")  # "rank:step": a test hook for crash handling
        if fail_at and fail_at == f"{self.rank}:{self.step + 1}":
            raise RuntimeError(f"injected failure (MOE_DIST_FAIL_AT={fail_at})")
        return torch.stack(losses).mean().item()

    def save(self) -> Path:
        state = {"optimizer_step": ckpt.adam_step(self.engine), "scheduler": self.scheduler.state_dict(),
                 "data_position": self.batches.state_dict(), "ep_size": self.ep_size, "method": self.cfg.method,
                 "importance_LE": None if self.importance_LE is None else self.importance_LE.tolist(),
                 "placements": {str(l): list(p.owner) for l, p in current_placements(self.model).items()},
                 "config": asdict(self.cfg),
                 # where the base came from and its shape: export finds and checks its base by these
                 "model_dir": str(Path(self.model_dir).resolve()), "base_shape": shape_summary(self.hf_config)}
        return ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.engine, adapter_params(self.model), self.plan.to_json(),
                                    state, self._routing_tensors(), self.cfg.checkpoint.keep, self.lori_masks())

    def collect_routing(self):
        """Collective: drain the model's counters into the run total and the method's window."""
        stats = collect_routing_stats(self.model)
        self.routing_total = stats if self.routing_total is None else self.routing_total + stats
        self.routing_window = stats if self.routing_window is None else self.routing_window + stats
        self.routing_balance = stats if self.routing_balance is None else self.routing_balance + stats
        return stats

    def epng_due(self) -> bool:
        e = self.cfg.epng
        return (self.cfg.method == "epng" and self.step >= e.warmup_steps and (self.step - e.warmup_steps) % e.interval == 0
                and self.step < self.cfg.train.steps and not (e.stop_step and self.step >= e.stop_step))

    def epng_update(self) -> str | None:
        """Importance from the window since the last update -> prune/grow plan -> agree -> rebuild."""
        e = self.cfg.epng
        self.collect_routing()
        window, self.routing_window = self.routing_window, None
        self.importance_LE = decayed_importance(self.importance_LE, window, e.decay)
        new_plan = prune_and_grow(self.importance_LE, window.layers, self.plan, e.prune_ratio, e.grow_ratio,
                                  e.rank_unit, e.max_rank)
        agree_on_plan(new_plan, f"epng plan at step {self.step}")
        if new_plan == self.plan:
            return None
        old = self.plan
        t0 = time.perf_counter()
        placements = None
        if self.cfg.repartition.enabled and self.ep_size > 1:  # rebalance in the same rebuild
            placements, now, after = plan_placements(self.model, new_plan, window.tokens_LE, window.layers)
            self.routing_balance = None
            if placements == current_placements(self.model):
                placements = None
        info = restructure(self, new_plan, placements)
        if info["move"] is not None:
            info["move"].imbalance_before, info["move"].imbalance_after = now, after
            info["move"].seconds = time.perf_counter() - t0
            self.pending_moves.append((f"epng step {self.step}", info["move"]))
        self.trainable_total = self.count_trainable()
        pruned = sorted({(l, e_) for (l, e_, _) in old.expert_ranks} - {(l, e_) for (l, e_, _) in new_plan.expert_ranks})
        grown = sorted({(l, e_) for (l, e_, p), r in new_plan.expert_ranks.items() if r > old.rank(l, e_, p)})
        return (f"epng step {self.step}: pruned {len(pruned)} expert adapters {pruned}, grew {grown}; "
                f"rank budget {sum(old.expert_ranks.values())} -> {sum(new_plan.expert_ranks.values())}; "
                f"{info['layers_rebuilt']} layers rebuilt in {time.perf_counter() - t0:.2f}s")

    def dmep_due(self) -> bool:
        d = self.cfg.dmep
        points = [d.prune_start + i * d.prune_interval for i in range(d.prune_times)]
        return self.cfg.method == "dmep" and self.step in points and self.step < self.cfg.train.steps

    def dmep_last_prune_passed(self) -> bool:
        d = self.cfg.dmep
        return d.prune_times == 0 or self.step >= d.prune_start + (d.prune_times - 1) * d.prune_interval

    def dmep_prune(self) -> str:
        """Utilisation since the last decision -> per-module prune -> agree -> rebuild; the
        load-balancing loss goes off after the last prune point."""
        d = self.cfg.dmep
        util = collect_utilisation(self.model)
        new_plan = dmep_prune_plan(util, self.plan, d.util_threshold)
        agree_on_plan(new_plan, f"dmep plan at step {self.step}")
        before = sum(len(v) for v in self.plan.lora_moe.values())
        if new_plan != self.plan:
            restructure(self, new_plan)
            self.trainable_total = self.count_trainable()
        if self.dmep_last_prune_passed():
            set_load_balancing(self.model, False)
        after = sum(len(v) for v in new_plan.lora_moe.values())
        widths = sorted(len(v) for v in new_plan.lora_moe.values())
        return (f"dmep step {self.step}: LoRA experts {before} -> {after} over {len(new_plan.lora_moe)} modules "
                f"(widths {widths[0]}..{widths[-1]}); load balancing {'off' if self.dmep_last_prune_passed() else 'on'}")

    def structure_change(self) -> str | None:
        """The method's decision due at this step, if any (a collective on every rank)."""
        if self.cfg.method == "hellori" and self.step == self.cfg.hellori.stage1_steps:
            return self.lori_stage2()
        if self.dmep_due():
            return self.dmep_prune()
        if self.epng_due():
            return self.epng_update()
        return None

    def rebalance_due(self) -> bool:
        r = self.cfg.repartition
        if self.ep_size == 1 or not experts_modules(self.model) or self.step >= self.cfg.train.steps:
            return False
        return self.step == r.force_step or bool(r.every and self.step % r.every == 0)

    def rebalance(self) -> None:
        """Collective: counts since the last placement decision -> balanced placement; move if
        the expected imbalance passes the threshold (or this is the forced step)."""
        force = self.step == self.cfg.repartition.force_step
        self.collect_routing()
        window, self.routing_balance = self.routing_balance, None
        placements, now, after = plan_placements(self.model, self.plan, window.tokens_LE, window.layers,
                                                 min_gain=0.0 if force else 0.01)
        if placements == current_placements(self.model) or not (force or now > self.cfg.repartition.threshold):
            return
        report = repartition(self, placements)
        report.imbalance_before, report.imbalance_after = now, after
        self.pending_moves.append((f"step {self.step}{' (forced)' if force else ''}", report))

    def lori_masks(self) -> dict[str, torch.Tensor]:
        return {k: m for mod in experts_modules(self.model).values() for k, m in mod.adapters.lori_masks().items()}

    def lori_stage2(self) -> str:
        """HELLoRI: masks from stage 1's B magnitudes, then B restarts at zero under the masks,
        fresh optimizer state, learning rate x stage2_lr_scale (the schedule goes on)."""
        h = self.cfg.hellori
        moe_groups = [bool(g.get("moe")) for g in self.scheduler.optimizer.param_groups]
        values, optim, step, scheduler_state, counters = teardown(self)
        params = adapter_params(self.model)
        with torch.no_grad():  # masks from the fp32 masters
            for k, v in values.items():
                params[k].copy_(v.to(params[k].dtype))
        threshold, kept = sparsify_lori(params, self.lori_masks(), h.sparsity)
        masks = self.lori_masks()
        values = {k: (torch.zeros_like(v) if k in masks else v) for k, v in values.items()}
        optim = {k: v for k, v in optim.items() if k.rsplit("/", 1)[0] not in masks}  # LoRI B: fresh state
        # Only the expert (LoRI) groups: attention adapters stay plain LoRA on the normal schedule.
        scheduler_state = dict(scheduler_state, base_lrs=[lr * h.stage2_lr_scale if moe else lr
                                                          for lr, moe in zip(scheduler_state["base_lrs"], moe_groups)])
        rebuild_engine(self, values, optim, step, scheduler_state, counters)
        return (f"hellori step {self.step}: LoRI masks at |B| > {threshold:.3g} keep {100 * kept:.1f}% of B here; "
                f"B restarted at zero, expert-adapter lr x{h.stage2_lr_scale}")

    def _routing_tensors(self) -> dict[str, torch.Tensor]:
        r = self.routing_total
        return {} if r is None else {"tokens_LE": r.tokens_LE, "mass_LE": r.mass_LE,
                                     "layers": torch.tensor(r.layers)}

    def adapter_flops_per_token(self, share_LE: torch.Tensor, layers: list[int]) -> float:
        """Expected adapter FLOPs of one token under the measured routing load."""
        top_k = getattr(self.hf_config, "num_experts_per_tok", 1)
        mods = experts_modules(self.model)
        expert = sum(share_LE[i, e].item() * top_k * mods[layer].adapters.flops_per_token(e)
                     for i, layer in enumerate(layers) for e in mods[layer].local_experts)
        expert = global_sum(expert, self.device) / (self.world // self.ep_size)  # EDP replicas counted once
        # Attention LoRA and LoRA-MoE run on every token (LoRA-MoE computes all its experts).
        dense = sum(2 * p.numel() for k, p in adapter_params(self.model).items() if ".experts." not in k)
        return expert + dense

    def flush_moves(self, logger: MetricsLogger) -> None:
        for why, report in self.pending_moves:
            logger.record(self.step, "repartition", {
                "imbalance_before": report.imbalance_before, "imbalance_after": report.imbalance_after,
                "experts_moved": report.experts_moved, "bytes_moved": report.bytes_moved, "seconds": report.seconds},
                {"reason": why, "placements": {str(l): list(p.owner) for l, p in current_placements(self.model).items()}})
            logger.print(f"{why}: {report.line()}")
        self.pending_moves = []

    def expert_imbalance(self) -> float | None:
        """Expected max/mean per-rank cost of the run's routing under the final placement."""
        r, mods = self.routing_total, experts_modules(self.model)
        if r is None or not mods or self.ep_size == 1:
            return None
        any_mod = next(iter(mods.values()))
        return imbalance(layer_costs(self.plan, r.tokens_LE, r.layers, any_mod.hidden_size, any_mod.intermediate_size),
                         current_placements(self.model))

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        logger = MetricsLogger(cfg.output_dir, self.is_main, cfg.train.steps, self.step)
        tokens_per_step = cfg.train.micro_batch * cfg.data.seq_len * cfg.train.grad_accum * self.world
        self.log(f"model {cfg.model} ({self.hf_config.model_type}), world {self.world}, EP {self.ep_size}, "
                 f"method {cfg.method}, trainable params {self.trainable_total:,}, logs in {cfg.output_dir}")
        for text in self.pending_events:
            logger.event(self.step, text)
        self.flush_moves(logger)
        before = self.evaluate() if cfg.eval.before and self.step == 0 else None
        if before:
            logger.eval(self.step, before)
        losses, times = [], []
        t_log, steps_since_log = time.perf_counter(), 0
        collect_routing_stats(self.model)  # reset counters touched by evaluation
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.step += 1
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            steps_since_log += 1
            logger.advance()
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                stats = self.collect_routing()
                elapsed = time.perf_counter() - t_log
                mean_loss = global_sum(sum(losses[-steps_since_log:]) / steps_since_log, self.device) / self.world
                logger.step(self.step, {"loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                                        "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                                        "tokens_per_sec": tokens_per_step * steps_since_log / elapsed,
                                        "trainable_params": self.trainable_total})
                logger.heatmap("routing/expert_load", self.step, stats.load_share_LE())
                logger.heatmap("routing/router_mass", self.step, stats.mass_share_LE())
                t_log, steps_since_log = time.perf_counter(), 0
            event = self.structure_change()
            if event:
                logger.event(self.step, event)
                logger.print(event)
            if self.rebalance_due():
                self.rebalance()
            self.flush_moves(logger)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                logger.eval(self.step, self.evaluate())
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                path = self.save()
                logger.print(f"checkpoint {path}")
        after = self.evaluate()
        if after:
            logger.eval(self.step, after)
        final = self.save()
        logger.close()
        r = self.routing_total
        flops = self.adapter_flops_per_token(r.load_share_LE(), r.layers) if r is not None else None
        last = times[-max(1, len(times) // 4):]
        run_losses = global_sum(sum(losses[-5:]) / max(1, len(losses[-5:])), self.device) / self.world
        summary = {
            "method": cfg.method, "model": cfg.model, "world_size": self.world, "ep_size": self.ep_size,
            "trainable_params": self.trainable_total, "adapter_flops_per_token": flops,
            "expert_imbalance": self.expert_imbalance(),
            "steps": self.step, "tokens_per_sec": tokens_per_step * len(times) / sum(times) if times else None,
            # after the structure changes have happened (DMEP prunes, EPnG grows): the last quarter
            "tokens_per_sec_final": tokens_per_step * len(last) / sum(last) if last else None,
            "first_loss": losses[0] if losses else None, "final_loss": run_losses if losses else None,
            "accuracy_before": before["accuracy"] if before else None,
            "accuracy_after": after["accuracy"] if after else None,
            "eval_samples": after["samples"] if after else [],
            "checkpoint": str(final), "output_dir": cfg.output_dir,
        }
        if self.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            self.print_summary(summary)
        return summary

    def print_summary(self, s: dict) -> None:
        acc = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        self.log("\n".join(line for line in [
            "=" * 60,
            f"moe_dist {s['method']} on {s['model']}: world {s['world_size']}, EP {s['ep_size']}, {s['steps']} steps",
            f"  loss            {s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] is not None else "",
            f"  exact match     {acc(s['accuracy_before'])} before -> {acc(s['accuracy_after'])} after",
            f"  trainable       {s['trainable_params']:,} params, "
            f"{(s['adapter_flops_per_token'] or 0) / 1e6:.3f} MFLOP/token in adapters",
            f"  throughput      {s['tokens_per_sec'] or 0:.0f} tokens/s",
            f"  expert balance  max/mean per-rank cost {s['expert_imbalance']:.3f} over EP {s['ep_size']}"
            if s.get("expert_imbalance") is not None else "",
            f"  logs            {s['output_dir']} (summary.json, metrics.jsonl, tensorboard/)",
            f"  checkpoint      {s['checkpoint']}",
            "=" * 60] if line))
