"""The non-linear ops: exact numpy references (registry) and their PyTorch drop-ins."""
from ops.registry import OPS, Op, custom_op, get_op, op_names

__all__ = ["OPS", "Op", "custom_op", "get_op", "op_names"]
