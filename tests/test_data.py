"""Data pipeline: tokenization with a response-only loss mask, bad-row accounting, packing
without cross-document attention (the HF model is the oracle), sharding and its resumable
position; LR schedule and config validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from reference import build_hf

from moe_dist.config import ConfigError, RunConfig
from moe_dist.data.arithmetic import pretraining_corpus
from moe_dist.data.dataset import IGNORE_INDEX, DataError, RowEncoder, encode_dataset, load_rows
from moe_dist.data.packing import ShardedBatches, pack_examples
from moe_dist.models.embedded import build_tokenizer
from moe_dist.train.engine import warmup_cosine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(pretraining_corpus(300, seed=0), vocab_size=300)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_response_mask_and_bad_rows(tmp_path, tokenizer):
    rows = [{"prompt": "Ann has 3 apples.\n", "response": "3"}, {"prompt": "Bo has 2.\n", "response": "2"},
            {"prompt": "no answer here\n"}, {"prompt": "  ", "response": "1"},
            {"prompt": "long " * 200, "response": "9"}]
    source = _write_jsonl(tmp_path / "d.jsonl", rows)
    enc = RowEncoder(tokenizer, "prompt", "response", "messages")
    ds, report = encode_dataset(load_rows(source, "train"), enc, 64, source)
    assert (report.rows, report.kept) == (5, 2)
    assert report.dropped == {"missing_field": 1, "empty": 1, "too_long": 1, "template_mismatch": 0}
    assert "5 rows, 2 kept" in report.line() and "1 too long" in report.line()
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    n_prompt = len(tokenizer("Ann has 3 apples.\n", add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:], skip_special_tokens=True) == "3"


def test_chat_messages_match_prompt_response(tmp_path, tokenizer):
    """The chat template renders a conversation to the same tokens as the text form."""
    chat = [{"messages": [{"role": "user", "content": "Ann has 3 apples.\n"}, {"role": "assistant", "content": "3"}]},
            {"messages": [{"role": "user", "content": "x"}]}]
    enc = RowEncoder(tokenizer, "prompt", "response", "messages")
    ds, report = encode_dataset(load_rows(_write_jsonl(tmp_path / "c.jsonl", chat), "train"), enc, 64, "chat")
    assert report.kept == 1 and report.dropped["missing_field"] == 1
    text = [{"prompt": "Ann has 3 apples.\n", "response": "3"}]
    ref, _ = encode_dataset(load_rows(_write_jsonl(tmp_path / "t.jsonl", text), "train"), enc, 64, "text")
    assert ds[0]["input_ids"] == ref[0]["input_ids"] and ds[0]["labels"] == ref[0]["labels"]


def test_bad_sources_name_the_fault(tmp_path, tokenizer):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"), "train")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_rows(str(tmp_path / "empty.jsonl"), "train")
    source = _write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    enc = RowEncoder(tokenizer, "prompt", "response", "messages")
    with pytest.raises(DataError, match="question"):
        encode_dataset(load_rows(source, "train"), enc, 64, source)
    source = _write_jsonl(tmp_path / "all_bad.jsonl", [{"prompt": "", "response": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        encode_dataset(load_rows(source, "train"), enc, 64, source)


def test_packed_rows_do_not_attend_across_documents():
    """Logits of documents packed into one row (positions restarting) equal each document run
    alone: transformers derives the block-causal mask from the position ids."""
    model = build_hf("olmoe")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (7, 12, 5)]
    row = pack_examples([(d, d) for d in docs], seq_len=30, pad_id=0)
    assert len(row) == 1 and row[0]["position_ids"][:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([row[0]["input_ids"]]), position_ids=torch.tensor([row[0]["position_ids"]]),
                       use_cache=False).logits[0]
        start = 0
        for d in docs:
            alone = model(input_ids=torch.tensor([d]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)


def test_sharding_disjoint_and_position_resumes_on_another_world():
    examples = [([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(200)]

    def loaders(world):
        return [ShardedBatches(examples, 16, 2, r, world, seed=3, packing=True, pad_id=0) for r in range(world)]

    two = loaders(2)
    seen = [torch.cat([two[r].next_batch()["input_ids"] for r in range(2)]) for _ in range(3)]
    assert not set(seen[0][0].tolist()) & set(seen[0][2].tolist()) - {0}  # ranks got different rows
    # Stop after 3 global micro-steps of world 2 (12 rows); resume the position on world 4.
    four = loaders(4)
    for ld in four:
        ld.load_state_dict(two[0].state_dict())
    resumed = torch.cat([ld.next_batch()["input_ids"] for ld in four])
    uninterrupted = torch.cat([torch.cat([ld.next_batch()["input_ids"] for ld in two]) for _ in range(2)])
    assert torch.equal(resumed, uninterrupted)
    # Epochs roll over with a new order, and positions say so.
    for _ in range(40):
        two[0].next_batch()
    assert two[0].state_dict()["epoch"] >= 1


def test_warmup_cosine():
    f = [warmup_cosine(s, 4, 20, 0.1) for s in range(20)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] > 0.1 - 1e-9
    assert warmup_cosine(100, 4, 20, 0.1) == pytest.approx(0.1)
    assert math.isclose(warmup_cosine(12, 4, 20, 0.0), 0.5)


@pytest.mark.parametrize("override,message", [
    ({"ep_size": 3}, "ep_size (3) must divide the world size (4)"),
    ({"ep_size": 4}, "ep_size (4) must divide the model's expert count (6)"),
    ({"train.warmup_steps": 500}, "train.warmup_steps"),
    ({"data.seq_len": 0}, "data.seq_len"),
    ({"method": "magic"}, "method 'magic'"),
])
def test_config_errors_name_the_key(override, message):
    cfg = RunConfig()
    for key, value in override.items():
        obj = cfg
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate(4, num_experts=6 if override.get("ep_size") == 4 else 8)
    assert message in str(err.value)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "launch" / "recipes").glob("*.yaml")))
def test_recipes_are_valid(recipe):
    from moe_dist.config import load_config
    from moe_dist.parallel.elastic import parse_ep_size

    cfg = load_config(str(ROOT / "launch" / "recipes" / recipe), [])
    cfg.ds_config = str(ROOT / cfg.ds_config)
    _, ep = parse_ep_size(cfg.ep_size)  # the recipe's preferred EP size (auto:N or N)
    cfg.validate(world_size=ep or 2, num_experts=64 if ep else None)


def test_hard_arithmetic_variant(tmp_path):
    """embedded:arithmetic-hard: deterministic, train/test disjoint by number chain, 3-5 steps
    with a distractor of the other pronoun, only words the base task and the corpus use; the
    base variant's rows are unchanged by its existence."""
    import re

    from moe_dist.data import arithmetic as a
    from moe_dist.models.embedded import embedded_task_files

    train, test = a.make_examples(300, 0, "train", "hard"), a.make_examples(100, 0, "test", "hard")
    assert train == a.make_examples(300, 0, "train", "hard") and train != a.make_examples(300, 1, "train", "hard")
    chain = lambda ex: re.findall(r"-?\d+", ex["response"])[:-1]  # noqa: E731  the numbers of the equations
    assert not {tuple(chain(e)) for e in train} & {tuple(chain(e)) for e in test}
    pronouns = {n: p for n, p in a.NAMES}
    for ex in train + test:
        assert ex["response"].count(" = ") in (3, 4, 5), ex
        names = re.findall(r"\b([A-Z][a-z]+) has \d+", ex["prompt"])
        assert len(names) == 2 and pronouns[names[0]] != pronouns[names[1]], ex["prompt"]
        asked = re.search(r"How many (\w+) does (\w+) have now", ex["prompt"]).groups()
        assert asked[1] == names[0] and ex["prompt"].count(f" {asked[0]}") == 2  # the distractor's object differs
    words = lambda rows: {w for r in rows for w in re.findall(r"[A-Za-z]+|\d+", r)}  # noqa: E731
    known = words(a.pretraining_corpus(3000, seed=0)) | words(a.task_vocabulary())
    assert words(e["prompt"] + e["response"] for e in train + test) <= known
    base = a.make_examples(50, 0, "train")
    assert all(e["response"].count(" = ") in (2, 3) for e in base)

    model_dir = tmp_path / "m"  # files of another variant are written beside the shipped ones
    a.write_task(model_dir / "task", 20, 10, 0)
    files = embedded_task_files(model_dir, "hard")
    assert files["train"].parent == model_dir / "task" / "hard" and len(a.read_task(files["test"])) == 500
    assert a.read_task(files["train"])[:5] == a.make_examples(5, 0, "train", "hard")


def test_eval_warns_when_max_new_tokens_cuts_references(cache_dir):
    """The hard task's 5-step chains are longer than the recipes' eval.max_new_tokens (40):
    those references could never match, and the run says so, naming the field and the value
    that fits; with that value it is silent."""
    from transformers import AutoTokenizer

    from moe_dist.config import load_config
    from moe_dist.train.setup import load_eval_set, references_longer_than

    model_dir = next(p for p in cache_dir.glob("tiny-olmoe-*") if (p / "build.json").is_file())
    tok = AutoTokenizer.from_pretrained(model_dir)
    short = len(tok("1 + 2 = 3. Answer: 3", add_special_tokens=False)["input_ids"])
    assert references_longer_than(tok, ["1 + 2 = 3. Answer: 3"], short) == (0, short)
    assert references_longer_than(tok, ["1 + 2 = 3. Answer: 3"], short - 1) == (1, short)
    overrides = [f"model={model_dir}", "data.eval=embedded:arithmetic-hard", "eval.samples=100"]
    cfg = load_config(str(ROOT / "launch" / "recipes" / "tiny_lora.yaml"), overrides)
    lines: list[str] = []
    held = load_eval_set(cfg, tok, model_dir, lines.append)
    assert held.metrics == ("loss", "exact_match") and held.loss_rows  # both, for an embedded task
    refs = held.references
    cut, longest = references_longer_than(tok, refs, cfg.eval.max_new_tokens)
    assert cfg.eval.max_new_tokens == 40 and cut > 0 and longest > 40
    warning = [ln for ln in lines if ln.startswith("WARNING: eval.max_new_tokens=40")]
    assert warning and f"set eval.max_new_tokens={longest}" in warning[0]
    lines.clear()
    cfg = load_config(str(ROOT / "launch" / "recipes" / "tiny_lora.yaml"), [*overrides, f"eval.max_new_tokens={longest}"])
    load_eval_set(cfg, tok, model_dir, lines.append)
    assert not [ln for ln in lines if ln.startswith("WARNING")]
