"""Shared test helpers: prove that nothing was mutated; turn a hang into a failure."""

import contextlib
import signal

import torch

import fvtransform as fvt


class ConvNet(torch.nn.Module):
    """A convolution and two linears: the LoRA call tests' model (conv and linear targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = torch.nn.Linear(16, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))  # [N, 4]
        h = torch.cat([h, h, h, h], dim=1)  # [N, 16]
        return self.fc2(torch.relu(self.fc1(h)))


class TiedEmbedding(torch.nn.Module):
    """An embedding and an output head that share one weight, plus two kinds of buffer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("table", torch.ones(2), persistent=False)
        self.register_buffer("stat", torch.zeros(2))

    def forward(self, ids):
        return self.head(self.emb(ids))


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


class Hung(BaseException):
    """Raised by :func:`deadline`: a BaseException, so no ``except OSError``/``except Exception`` in the code under test hides it."""


@contextlib.contextmanager
def deadline(seconds: float = 5.0):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or a long loop after ``seconds``."""

    def fire(_sig, _frame):
        raise Hung(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
