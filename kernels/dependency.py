"""Placeholder: being written (see kernels.md)."""


def token_dependency(*args, **kwargs):
    raise NotImplementedError("token_dependency is not written yet")


def token_dependency_linear(*args, **kwargs):
    raise NotImplementedError("token_dependency_linear is not written yet")
