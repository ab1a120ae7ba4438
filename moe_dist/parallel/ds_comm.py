"""DeepSpeed's gradient collectives for CPU ranks of one host over shared memory.

Why: ZeRO reduces the gradients, sums the norm and gathers the updated partitions with gloo
every step: about seven collectives, each paying gloo's fixed ~0.3-0.5 ms on a small box and
milliseconds on a gradient bucket (measured: a 130k-float all-reduce 2.9 ms). The host
exchange (host_exchange.py), which already carries the experts' all-to-all, does them in a
few microseconds of synchronisation plus the copies.

`install()` wraps DeepSpeed's communication backend (`deepspeed.comm.comm.cdb`, the object
every `deepspeed.comm` call goes through) once `deepspeed.init_distributed` has made it:
synchronous all_reduce, reduce and all_gather_into_tensor of CPU tensors on gloo groups of
one host take the exchange; every other call (NCCL, async, other ops, other hosts) reaches
DeepSpeed's own backend unchanged. MOE_DIST_HOST_EXCHANGE=0 turns it off with the all-to-all.
"""

from __future__ import annotations

import os

from deepspeed.comm.reduce_op import ReduceOp

from moe_dist.parallel import host_exchange


class HostCollectives:
    """DeepSpeed's backend object, with three collectives through the host exchange."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def all_reduce(self, tensor, op=ReduceOp.SUM, group=None, async_op=False):
        if not async_op and host_exchange.all_reduce(tensor, self.inner._reduce_op(op), group):
            return None
        return self.inner.all_reduce(tensor, op, group, async_op)

    def reduce(self, tensor, dst, op=ReduceOp.SUM, group=None, async_op=False):
        if not async_op and host_exchange.reduce(tensor, dst, self.inner._reduce_op(op), group):
            return None
        return self.inner.reduce(tensor=tensor, dst=dst, op=op, group=group, async_op=async_op)

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        if not async_op and host_exchange.all_gather_into_tensor(output_tensor, input_tensor, group):
            return None
        return self.inner.all_gather_into_tensor(output_tensor=output_tensor, input_tensor=input_tensor, group=group,
                                                 async_op=async_op)


def install() -> bool:
    """Wrap DeepSpeed's backend (after deepspeed.init_distributed); True when wrapped now or before."""
    import deepspeed.comm.comm as ds_comm

    if os.environ.get("MOE_DIST_HOST_EXCHANGE", "1") == "0" or ds_comm.cdb is None:
        return False
    if not isinstance(ds_comm.cdb, HostCollectives):
        ds_comm.cdb = HostCollectives(ds_comm.cdb)
    return True
