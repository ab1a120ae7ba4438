"""LoRA (the baseline): an adapter on every routed expert's projections and on the
architecture's attention projections; no structure change. The smallest method: the
protocol's defaults (moe_dist/methods/base.py) plus a name."""

from __future__ import annotations

from moe_dist.methods.base import Method, register


@register
class LoRA(Method):
    name = "lora"
