"""Tensor parallelism: process groups and collectives (`group`), which part of a checkpoint tensor each rank holds
(`sharding`), and the worker processes of a multi-process engine (`worker`, `executor`)."""

from lm_torch.distributed.group import SINGLE, TPGroup, destroy_tp_group, init_tp_group, parse_addr

__all__ = ["SINGLE", "TPGroup", "destroy_tp_group", "init_tp_group", "parse_addr"]
