"""Rows -> tokenized training examples with a response-only loss mask, through `datasets`.

Sources: a hub dataset name, a local json/jsonl/parquet/csv file or a directory of them.
Rows are either prompt/response columns (named in the config) or chat `messages` rendered
with the tokenizer's chat template. Bad rows are counted by reason and dropped, never fed;
`DataReport.line()` is the one summary line a user sees.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets

IGNORE_INDEX = -100
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
REASONS = ("missing_field", "empty", "too_long", "template_mismatch")


class DataError(ValueError):
    pass


@dataclass
class DataReport:
    source: str
    rows: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.rows - sum(self.dropped.values())

    def line(self) -> str:
        drops = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.dropped.items() if n) or "none"
        return f"data {self.source}: {self.rows} rows, {self.kept} kept; dropped: {drops}"


MAX_LISTED = 10  # malformed lines named by number in the log line


def _load_jsonl(path: Path, log) -> datasets.Dataset:
    """JSON lines read one by one: a malformed line is a bad row (counted, its line number
    logged), not a reason to reject the file."""
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad.append(number)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(number)
    if bad:
        listed = ", ".join(map(str, bad[:MAX_LISTED])) + (", ..." if len(bad) > MAX_LISTED else "")
        log(f"data {path}: {len(bad)} malformed JSON lines (lines {listed}) skipped")
    if not rows:
        raise DataError(f"data file {path}: no valid JSON rows ({len(bad)} malformed lines)")
    columns = list(dict.fromkeys(k for row in rows for k in row))  # every key of any row, first-seen order
    return datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in columns})


def load_rows(source: str, split: str, subset: str = "", log=print) -> datasets.Dataset:
    """One split of a hub dataset, a local file, or a local directory of data files."""
    path = Path(source)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"data file {source} is empty")
        if path.is_file() and path.suffix == ".jsonl":
            ds = _load_jsonl(path, log)
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(f"{source}: unknown data file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
            # A single file is the whole dataset: its only split is "train", whatever the role.
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split)
        elif source.startswith((".", "/")) or path.suffix in FILE_BUILDERS:
            raise DataError(f"data file {source!r} does not exist")
        else:
            ds = datasets.load_dataset(source, subset or None, split=split)
    except DataError:
        raise
    except Exception as exc:  # missing split, offline hub, unreadable file: name the source
        raise DataError(f"cannot load dataset {source!r} split {split!r}: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise DataError(f"dataset {source!r} split {split!r} has no rows")
    return ds


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class RowEncoder:
    """Encodes one row to (prompt_ids, response_ids, reference text) or a drop reason.

    Prompt and response are tokenized separately and concatenated (LLaMA-Factory does the
    same) so the loss mask is exact; the prompt starts with BOS and the response ends with EOS
    when the tokenizer has them. Chat rows: the prompt is the template up to the generation
    prompt, the response is the rest of the fully rendered conversation.
    """

    def __init__(self, tokenizer, prompt_column: str, response_column: str, messages_column: str):
        self.tokenizer = tokenizer
        self.prompt_column, self.response_column, self.messages_column = prompt_column, response_column, messages_column

    def mode(self, columns: list[str], source: str) -> str:
        if self.prompt_column in columns:
            if self.response_column not in columns:
                raise DataError(f"dataset {source!r} has column {self.prompt_column!r} but no {self.response_column!r} "
                                f"(columns: {columns}); set data.response_column")
            return "prompt_response"
        if self.messages_column in columns:
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(f"dataset {source!r} has chat rows ({self.messages_column!r}) but the tokenizer has no "
                                "chat template; use an instruct model or prompt/response columns")
            return "messages"
        raise DataError(f"dataset {source!r} has neither {self.prompt_column!r} nor {self.messages_column!r} "
                        f"(columns: {columns}); set data.prompt_column / data.messages_column")

    def encode(self, row: dict, mode: str) -> tuple[list[int], list[int], str] | str:
        tok = self.tokenizer
        if mode == "prompt_response":
            prompt, response = row.get(self.prompt_column), row.get(self.response_column)
            if prompt is None or response is None:
                return "missing_field"
            if not str(prompt).strip() or not str(response).strip():
                return "empty"
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            return bos + _ids(tok, str(prompt)), _ids(tok, str(response)) + eos, str(response)
        messages = row.get(self.messages_column)
        if not messages or not isinstance(messages, list) or any(not isinstance(m, dict) for m in messages):
            return "missing_field"
        if messages[-1].get("role") != "assistant" or any(m.get("content") is None for m in messages):
            return "missing_field"
        if not str(messages[-1]["content"]).strip():
            return "empty"
        prompt_ids = _template_ids(tok, messages[:-1], generation_prompt=True)
        full_ids = _template_ids(tok, messages, generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            return "template_mismatch"
        return prompt_ids, full_ids[len(prompt_ids):], str(messages[-1]["content"])


def encode_dataset(ds: datasets.Dataset, encoder: RowEncoder, seq_len: int, source: str,
                   for_generation: bool = False) -> tuple[datasets.Dataset, DataReport]:
    """Tokenized rows (`input_ids`, `labels`, `prompt_ids`, `reference`) and the drop report.

    For training a row must fit seq_len whole; for generation only its prompt must.
    """
    mode = encoder.mode(list(ds.column_names), source)

    def fn(row: dict) -> dict:
        out = encoder.encode(row, mode)
        if isinstance(out, str):
            return {"input_ids": [], "labels": [], "prompt_ids": [], "reference": "", "status": out}
        prompt_ids, response_ids, reference = out
        needed = len(prompt_ids) + (0 if for_generation else len(response_ids))
        status = "too_long" if needed > seq_len else "ok"
        return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                "prompt_ids": prompt_ids, "reference": reference, "status": status}

    encoded = ds.map(fn, remove_columns=list(ds.column_names), desc=f"tokenizing {source}")
    counts = collections.Counter(encoded["status"])
    report = DataReport(source, len(ds), {r: counts.get(r, 0) for r in REASONS})
    kept = encoded.filter(lambda s: s == "ok", input_columns="status").remove_columns("status")
    if len(kept) == 0:
        raise DataError(f"dataset {source!r}: no usable rows ({report.line()})")
    return kept, report
