"""Export a checkpoint for the ecosystem: `python launch/export.py --checkpoint DIR --format
merged|peft|vllm|moe_dist --out DIR [--base MODEL] [--dtype bf16|fp16|fp32]`.

One process, no process group, whatever world / EP size wrote the checkpoint. The base model
is the one the run trained on (recorded in the checkpoint) unless --base names another copy of
it. Nothing is written under --out unless the export completes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict:
    from moe_dist.export import FORMATS, ExportError, export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step-N directory under output_dir/checkpoints")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="a new (or empty) directory")
    parser.add_argument("--base", default=None, help="the base model (hub name or dir); default: the run's own")
    parser.add_argument("--dtype", default="", help="merged weights' dtype (default: the base's)")
    args = parser.parse_args(argv)
    try:
        return export(args.checkpoint, args.format, args.out, base=args.base, dtype=args.dtype)
    except ExportError as exc:
        sys.exit(f"export error: {exc}")


if __name__ == "__main__":
    main()
