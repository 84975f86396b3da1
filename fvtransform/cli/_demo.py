"""``fvtransform demo``: the library end to end on the built-in reference model."""

from __future__ import annotations

from collections.abc import Callable
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch

__all__ = ["run_demo", "DemoReport"]


@attrs.frozen
class StepResult:
    name: str
    seconds: float
    detail: str
    ok: bool


@attrs.frozen
class DemoReport:
    steps: tuple[StepResult, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": [attrs.asdict(s) for s in self.steps]}


def run_demo(*, workdir: str | None = None, seed: int = 0, echo: Callable[[str], None] = print) -> DemoReport:
    """Build, save (sharded), load lazily, run, LoRA merge/unmerge/restore; check every step."""
    import fvtransform as fvt
    from fvtransform.models import init_weights

    steps: list[StepResult] = []

    def step(name: str, fn: Callable[[], tuple[str, bool]]) -> None:
        t0 = time.perf_counter()
        detail, ok = fn()
        dt = time.perf_counter() - t0
        steps.append(StepResult(name, dt, detail, ok))
        echo(f"[{'ok' if ok else 'FAIL'}] {name:<34} {dt * 1000:8.1f} ms  {detail}")

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fvt-demo-"))
    state: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(seed)
    inputs = (
        torch.randn(1, 4, 2, 8, 8, generator=gen),
        torch.tensor([500]),
        torch.randn(1, 5, 16, generator=gen),
    )

    def build() -> tuple[str, bool]:
        module = fvt.build("fvt-video-dit")
        tree = fvt.ParamTree(init_weights(module, seed=seed))
        state.update(module=module, tree=tree)
        meta = all(p.device.type == "meta" for p in module.parameters())
        return f"VideoDiT on meta; {tree!r}", meta

    def save_load() -> tuple[str, bool]:
        fvt.save(state["tree"], tmp / "model", max_shard_size="20KB")
        loaded = fvt.load(tmp / "model")
        state["loaded"] = loaded
        shards = len(list((tmp / "model").glob("*.safetensors")))
        same = loaded == state["tree"] and loaded.same_order(state["tree"])
        return f"{shards} shards + index; reloaded bit for bit: {same}", same

    def run() -> tuple[str, bool]:
        out = fvt.call(state["module"], state["loaded"], *inputs)
        eager = fvt.build("fvt-video-dit", device="cpu")
        eager.load_state_dict(dict(state["tree"]))
        ref = eager(*inputs)
        state["out"] = out
        same = torch.equal(out, ref)
        return f"output {tuple(out.shape)}; equals the eager module: {same}", same

    step("build reference model", build)
    step("save sharded + load lazily", save_load)
    step("fvt.call forward", run)
    _lora_steps(step, state, inputs, tmp, seed)
    report = DemoReport(tuple(steps))
    echo(f"{'all checks passed' if report.ok else 'SOME CHECKS FAILED'} ({len(steps)} steps; files in {tmp})")
    return report


def _lora_steps(step: Callable[..., None], state: dict[str, Any], inputs: tuple[torch.Tensor, ...], tmp: Path, seed: int) -> None:
    try:
        import fvtransform.lora as lora
    except ImportError:  # pragma: no cover - the LoRA package is part of the library
        return
    import fvtransform as fvt

    def make() -> tuple[str, bool]:
        adapter = lora.random_adapter(state["loaded"], targets="blocks.*.attn*.to_*.weight", rank=4, alpha=4.0, seed=seed + 1, scale_b=0.05)
        lora.save(adapter, tmp / "lora", format="peft")
        back = lora.load(tmp / "lora", base=state["loaded"])
        state["adapter"] = back
        ok = len(back.targets) == len(adapter.targets)
        return f"{adapter!r} saved as PEFT, loaded strictly", ok

    def on_the_fly() -> tuple[str, bool]:
        merged = lora.merge(state["loaded"], state["adapter"])
        out_merged = fvt.call(state["module"], merged, *inputs)
        out_fly = lora.call(state["module"], state["loaded"], state["adapter"], *inputs)
        state["merged"] = merged
        err = (out_merged - out_fly).abs().max().item()
        changed = not torch.equal(out_merged, state["out"])
        return f"on-the-fly vs merged max |diff| {err:.2e}; LoRA changes output: {changed}", err < 1e-4 and changed

    def restore() -> tuple[str, bool]:
        merged, record = lora.merge(state["loaded"], state["adapter"], return_record=True)
        restored = lora.restore(merged, record)
        ok = restored == state["loaded"]
        return f"record {record.nbytes} B vs {record.targets_nbytes} B of targets; restored bit for bit: {ok}", ok

    def save_merged() -> tuple[str, bool]:
        fvt.save(state["merged"], tmp / "merged.safetensors", metadata={"fvt.lora": "demo adapter at 1.0"})
        ok = fvt.load(tmp / "merged.safetensors") == state["merged"]
        return f"merged model saved to {tmp / 'merged.safetensors'}", ok

    step("make LoRA, save/load PEFT", make)
    step("LoRA on the fly vs merged", on_the_fly)
    step("exact restore after merge", restore)
    step("save merged model", save_merged)
