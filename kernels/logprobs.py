"""Placeholder: being written (see kernels.md)."""


def token_logprobs(*args, **kwargs):
    raise NotImplementedError("token_logprobs is not written yet")


def token_logprobs_linear(*args, **kwargs):
    raise NotImplementedError("token_logprobs_linear is not written yet")
