"""Placeholder: being written (see kernels.md)."""


def topk_token_mask(*args, **kwargs):
    raise NotImplementedError("topk_token_mask is not written yet")
