"""Shared test helpers: prove that nothing was mutated."""

import fvtransform as fvt


def snapshot(tree):
    """Values, data pointers and versions of every tensor, to prove nothing was mutated."""
    return {k: (v.detach().clone(), v.data_ptr(), v._version) for k, v in tree.items()}


def assert_unchanged(tree, snap) -> None:
    assert list(tree) == list(snap)
    for k, v in tree.items():
        value, ptr, version = snap[k]
        assert v.data_ptr() == ptr, k
        assert v._version == version, k
        assert fvt.tensors_equal(v.detach(), value), k
