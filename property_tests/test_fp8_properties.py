"""Float8 laws (issue 17): dequantize . quantize within the rounding bound, stochastic rounding unbiased and
reproducible, quantize never mutates its input.

The rounding bound: round to nearest puts ``y = W / s`` within half a float8 step at ``y``'s magnitude, so
``|dequantize(quantize(W)) - W| <= s * ulp(|y|) / 2`` (plus float32's own roundings of ``W / s`` and ``q * s``,
a few parts in 2**24), where for float8_e4m3fn ``ulp(m) = 2**(floor(log2 m) - 3)`` for normal ``m >= 2**-6``
and ``2**-9`` below (subnormals); for float8_e5m2 ``2**(floor(log2 m) - 2)``, and ``2**-16`` below ``2**-14``.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import torch
from hypothesis import given

import fvtransform as fvt
from fvtransform.testing import assert_no_mutation, trees

#: float8 dtype -> (mantissa bits, smallest normal exponent)
_FORMAT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}
fp8_dtypes = st.sampled_from(list(_FORMAT))


def ulp(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float8 step at magnitude ``m`` (elementwise)."""
    mant, emin = _FORMAT[dtype]
    e = torch.floor(torch.log2(m.clamp_min(2.0**emin)))
    return torch.pow(2.0, e - mant)


@given(tree=trees(dtypes=[torch.float32, torch.bfloat16]), dtype=fp8_dtypes)
def test_dequantize_of_quantize_is_within_half_a_float8_step(tree, dtype):
    q = assert_no_mutation(fvt.quantize_fp8, tree, dtype)
    back = fvt.dequantize(q, torch.float32)
    for k, w in tree.items():
        if not (k.endswith(".weight") and w.dim() == 2):
            assert back[k] is w  # biases untouched
            continue
        s = q[k[: -len("weight")] + "scale_weight"]
        assert s.dtype is torch.float32 and s.shape == ()
        x = w.float()
        y = (x / s).abs()
        assert float(y.max()) <= torch.finfo(dtype).max if y.numel() else True
        bound = s * ulp(y, dtype) / 2 + x.abs() * 2.0**-22 + 1e-30
        err = (back[k].float() - x).abs()
        assert bool((err <= bound).all()), (k, float((err - bound).max()))


@given(tree=trees(dtypes=[torch.float32], tied=False), dtype=fp8_dtypes, seed=st.integers(0, 2**31))
def test_stochastic_rounding_is_reproducible_per_seed(tree, dtype, seed):
    a = fvt.quantize_fp8(tree, dtype, seed=seed)
    b = assert_no_mutation(fvt.quantize_fp8, tree, dtype, seed=seed)
    assert a == b  # the same bytes
    near = fvt.quantize_fp8(tree, dtype)
    for k in a:  # each stochastic result is one of the two neighbours of the exact value
        if a[k].dtype is dtype and a[k].dim() == 2:
            s = a[k[: -len("weight")] + "scale_weight"]
            y = tree[k] / s
            step = ulp(y.abs(), dtype)
            assert bool(((a[k].float() - y).abs() <= step * (1 + 2.0**-20)).all())
            assert bool(((a[k].float() - near[k].float()).abs() <= step * (1 + 2.0**-20)).all())


@given(value=st.floats(2.0**-5, 400.0, allow_nan=False), dtype=fp8_dtypes)
def test_stochastic_rounding_is_unbiased_over_seeds(value, dtype):
    """The mean over N seeds of round(x) is x within 5 standard errors: each draw is off by at most one step g
    (a two-point draw has standard deviation <= g / 2), so |mean - x| <= 5 * g / (2 * sqrt(N))."""
    n_seeds, copies = 64, 64
    tree = fvt.ParamTree({"l.weight": torch.full((1, copies), value)})
    draws = torch.stack([fvt.quantize_fp8(tree, dtype, layout="plain", seed=s)["l.weight"].float() for s in range(n_seeds)])
    n = n_seeds * copies
    g = float(ulp(torch.tensor(value), dtype))
    x = float(torch.tensor(value, dtype=torch.float32))
    assert abs(float(draws.double().mean()) - x) <= 5 * g / (2 * math.sqrt(n)) + 1e-12
