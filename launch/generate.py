"""A quick look at a trained model: `python launch/generate.py --model DIR [--adapter DIR]
--prompt "..." [--max-new-tokens N]`.

`--model`: an exported merged dir or any HF model; `--adapter`: an exported PEFT or moe_dist
adapter (see launch/export.py). The prompt goes through the tokenizer's chat template when it
has one (as a user turn, with the generation prompt), else as plain text. Greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    import torch

    from moe_dist.export import ExportError
    from moe_dist.export.use import load_exported

    if args.model is None and args.adapter is None:
        parser.error("give --model and/or --adapter")
    try:
        model, tokenizer = load_exported(args.model, args.adapter)
    except (ExportError, OSError) as exc:
        sys.exit(f"generate error: {exc}")
    outputs = []
    for prompt in args.prompt:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt)["input_ids"]
        input_ids = torch.tensor([list(ids)])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        outputs.append(text)
        print(f"> {prompt}\n{text}\n", flush=True)
    return outputs


if __name__ == "__main__":
    main()
