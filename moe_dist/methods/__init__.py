"""Fine-tuning methods behind one protocol (moe_dist/methods/base.py), looked up by name.

Each file is one method: its config section, its initial plan, its decisions. Importing this
package registers them all; `method_class(cfg.method)` is how the trainer finds one.
"""

from moe_dist.methods import dmep, epng, hellora, hellori, lora  # noqa: F401  (each registers itself)
from moe_dist.methods.base import METHODS, Change, Method, RunInfo, Start, method_class, method_sections, register

__all__ = ["METHODS", "Change", "Method", "RunInfo", "Start", "method_class", "method_sections", "register"]
