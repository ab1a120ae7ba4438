"""The two expert kernels, below both `adapters/` and `moe/` (each uses them, neither owns them):
`expert_loop` (per expert, LoRA added in place; the CPU kernel, compiled on first use) and
`grouped` (grouped matmuls over rank buckets; the GPU kernel)."""
