"""Evaluation on a held-out split, on every rank at once: the mean token loss (the measure
every trainer reports, meaningful on any data) and greedy-generation exact match (for tasks
with one short right answer, like the embedded arithmetic).

HF `generate` cannot be used with expert parallelism: it stops when *its* sequences end, and a
rank that stops early leaves the others waiting in an all-to-all forever. Here every rank runs
the same number of batches (short shards are padded with a repeated prompt whose answer is not
counted) and the same number of decoding steps: one all-reduce per step decides, for all ranks
together, whether every sequence has ended.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moe_dist.data.dataset import IGNORE_INDEX
from moe_dist.parallel.reduce import all_reduce


def greedy_generate(model, prompts: list[list[int]], pad_id: int, eos_id: int | None, max_new_tokens: int,
                    device: torch.device) -> list[list[int]]:
    """New tokens per prompt (up to EOS, exclusive), KV-cached, left-padded batch."""
    width = max(len(p) for p in prompts)
    ids_BL = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask_BL = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, use_cache=True)
    cache, new_tokens = out.past_key_values, []
    done_B = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    next_B = out.logits[:, -1].argmax(-1)
    for step in range(max_new_tokens):
        new_tokens.append(next_B)
        if eos_id is not None:
            done_B |= next_B == eos_id
        all_done = done_B.all().to(torch.int32)
        all_reduce(all_done, op=dist.ReduceOp.MIN)  # all ranks stop together, or none does
        if all_done.item() or step == max_new_tokens - 1:
            break
        mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], dim=1)
        pos_B1 = pos_BL[:, -1:] + 1 + step
        out = model(input_ids=next_B[:, None], attention_mask=mask_BL, position_ids=pos_B1, past_key_values=cache,
                    use_cache=True)
        cache, next_B = out.past_key_values, out.logits[:, -1].argmax(-1)
    tokens_BN = torch.stack(new_tokens, dim=1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in tokens_BN]


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[list[int]], references: list[str], max_new_tokens: int,
                batch_size: int, device: torch.device) -> dict:
    """Accuracy over all ranks: this rank takes prompts rank::world, then the counts are summed."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(prompts), world))
    per_rank = -(-len(prompts) // world)
    batches = -(-per_rank // batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    correct, samples = 0, []
    for b in range(batches):
        idx = mine[b * batch_size: (b + 1) * batch_size]
        batch = [prompts[i] for i in idx] or [prompts[0]]  # an empty shard still takes part
        outs = greedy_generate(model, batch, pad_id, tokenizer.eos_token_id, max_new_tokens, device)
        for i, new in zip(idx, outs):
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            correct += int(text == references[i].strip())
            if len(samples) < 3:
                samples.append({"reference": references[i], "generated": text})
    model.train(was_training)
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
    all_reduce(counts)
    return {"accuracy": (counts[0] / counts[1]).item(), "correct": int(counts[0]), "total": int(counts[1]),
            "samples": samples}


@torch.no_grad()
def generate_exact_match(model, tokenizer, prompts: list[list[int]], references: list[str], max_new_tokens: int,
                         batch_size: int) -> dict:
    """The same measure through plain transformers `generate` (greedy, left-padded batches), for
    exported models in one process: what a user of the merged / PEFT model would run."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    model.eval()
    correct, samples = 0, []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids_BL = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask_BL = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out_BN = model.generate(input_ids=ids_BL, attention_mask=mask_BL, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in enumerate(out_BN[:, width:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            ok = text == references[start + i].strip()
            correct += int(ok)
            if len(samples) < 3:
                samples.append({"reference": references[start + i], "generated": text})
    return {"accuracy": correct / max(1, len(prompts)), "correct": correct, "total": len(prompts), "samples": samples}


@torch.no_grad()
def token_loss(model, rows: list[dict], micro_batch: int, device: torch.device) -> dict:
    """Mean token loss (and perplexity) of held-out rows, packed or padded exactly as training
    packs them, over all ranks: this rank takes rows rank::world in batches of `micro_batch`,
    every rank runs the same number of forward passes (expert parallelism: an all-to-all per
    MoE layer), a rank out of rows runs a batch whose labels are all ignored. The loss is the
    sum of every scored token's loss over the count, whatever the batch boundaries: the same
    number at any EP size up to reduction order."""
    from moe_dist.kernels.packed_attention import flatten_packed_rows

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = rows[rank::world]
    per_rank = -(-len(rows) // world)
    batches = -(-per_rank // micro_batch)  # the same on every rank
    was_training = model.training
    model.eval()
    attn = model.config._attn_implementation
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for b in range(batches):
        chunk = mine[b * micro_batch: (b + 1) * micro_batch]
        batch = {k: torch.tensor([r[k] for r in (chunk or rows[:1])], device=device) for k in rows[0]}
        if not chunk:  # this rank's rows ran out: it still takes part, scoring nothing
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        batch = flatten_packed_rows(batch, attn)
        tokens = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
        loss = model(**batch, use_cache=False).loss
        if tokens > 0:
            total += torch.stack([loss.double() * tokens, tokens.double()])
    model.train(was_training)
    all_reduce(total)
    mean = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(total[1])}
