"""Vocabulary-wide fused kernels (docs/kernels.md). Knows nothing of RL.

Every function takes impl="auto" | "triton" | "torch"; "auto" runs Triton on CUDA tensors
and the memory-bounded chunked PyTorch version otherwise. `kernels.reference` holds the
naive definitions that tests and benchmarks compare against. One op per file:
dependency.py, dependency_linear.py, logprobs.py, logprobs_linear.py, topk.py; the online
log-sum-exp helpers they share live in _softmax.py, input checks and dispatch in _utils.py.
"""

from ._utils import IGNORE_INDEX, TokenStats
from .dependency import token_dependency
from .dependency_linear import token_dependency_linear
from .logprobs import token_logprobs
from .logprobs_linear import token_logprobs_linear
from .topk import topk_token_mask

__all__ = [
    "IGNORE_INDEX",
    "TokenStats",
    "token_dependency",
    "token_dependency_linear",
    "token_logprobs",
    "token_logprobs_linear",
    "topk_token_mask",
]
