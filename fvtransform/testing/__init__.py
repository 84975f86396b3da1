"""Hypothesis strategies and law helpers for your own property tests of trees and LoRA.

Needs the ``test`` extra (``pip install 'fvtransform[test]'``): importing this module without Hypothesis raises
:class:`~fvtransform.errors.MissingDependencyError`. Every tensor a strategy makes comes from a
``torch.Generator`` seeded by a Hypothesis-drawn seed (never torch's global RNG), so examples replay and shrink.
Each drawn tree is noted (``hypothesis.note``) with its values, so a counterexample reads well.

>>> from hypothesis import given, settings, strategies as st
>>> from fvtransform.testing import adapters, assert_restores_exactly, trees
>>> @settings(max_examples=5, database=None)
... @given(trees(), st.data())
... def test_restore(tree, data):
...     assert_restores_exactly(tree, data.draw(adapters(tree)))
>>> test_restore()
"""

from fvtransform.errors import MissingDependencyError as _MissingDependencyError

try:
    import hypothesis as _hypothesis  # noqa: F401  (the test extra)
except ModuleNotFoundError as _e:
    if _e.name != "hypothesis":
        raise
    raise _MissingDependencyError(
        "fvtransform.testing needs the package 'hypothesis', which is not installed. "
        "Install it with: pip install 'fvtransform[test]'"
    ) from _e

from fvtransform.testing._laws import assert_no_mutation, assert_order_independent, assert_restores_exactly
from fvtransform.testing._strategies import DTYPES, adapters, trees

__all__ = ["DTYPES", "adapters", "assert_no_mutation", "assert_order_independent", "assert_restores_exactly", "trees"]
