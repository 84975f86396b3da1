import hypothesis.strategies as st
import torch

import fvtransform as fvt

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8, torch.bool]
names = st.from_regex(r"[a-z]{1,4}(\.[a-z0-9_]{1,4}){0,3}", fullmatch=True)


@st.composite
def tensors(draw, dtypes=DTYPES, min_dims=0):
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=min_dims, max_size=3)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@st.composite
def trees(draw, min_size=1, max_size=8, dtypes=DTYPES):
    keys = draw(st.lists(names, min_size=min_size, max_size=max_size, unique=True))
    data = {k: draw(tensors(dtypes)) for k in keys}
    if len(keys) > 1 and draw(st.booleans()):
        data[keys[-1]] = data[keys[0]]  # a tied pair
    return fvt.ParamTree(data)
