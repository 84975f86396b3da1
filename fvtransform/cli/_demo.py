"""``fvtransform demo``: the library end to end on the built-in reference model."""

from __future__ import annotations

from collections.abc import Callable
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch

__all__ = ["run_demo", "run_model_demo", "DemoReport"]


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

    def to_dict(self) -> dict[str, bool | list[dict[str, str | float | bool]]]:
        return {"ok": self.ok, "steps": [attrs.asdict(s) for s in self.steps]}


def _stepper(steps: list[StepResult], echo: Callable[[str], None]) -> Callable[[str, Callable[[], tuple[str, bool]]], None]:
    """A ``step(name, fn)`` that times ``fn``, records its ``(detail, ok)`` in ``steps`` and echoes a line."""

    def step(name: str, fn: Callable[[], tuple[str, bool]]) -> None:
        t0 = time.perf_counter()
        detail, ok = fn()
        dt = time.perf_counter() - t0
        steps.append(StepResult(name, dt, detail, ok))
        echo(f"[{'ok' if ok else 'FAIL'}] {name:<34} {dt * 1000:8.1f} ms  {detail}")

    return step


def run_demo(*, workdir: str | None = None, seed: int = 0, echo: Callable[[str], None] = print) -> DemoReport:
    """Build, save (sharded), load lazily, run, LoRA merge/unmerge/restore; check every step."""
    import fvtransform as fvt
    from fvtransform.models import init_weights

    steps: list[StepResult] = []
    step = _stepper(steps, echo)

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
        ok = len(back) == len(adapter)
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
        merged, record = lora.merge_with_record(state["loaded"], state["adapter"])
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


def run_model_demo(*, model: str, lora_path: str, component: str | None = None, workdir: str | None = None,
                   seed: int = 0, echo: Callable[[str], None] = print) -> DemoReport:
    """The demo's checks on a real model and LoRA (paths or repo ids).

    Loads the model lazily and checks it against its module, resolves the LoRA
    strictly against it, compares on-the-fly and merged outputs of every
    targeted layer on random inputs (the model's own inputs are
    model-specific), restores the original bit for bit and saves the merge.
    """
    import fvtransform as fvt

    steps: list[StepResult] = []
    state: dict[str, Any] = {}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fvt-demo-"))

    step = _stepper(steps, echo)

    def load() -> tuple[str, bool]:
        module, tree = fvt.load_model(model, component)
        state["module"], state["tree"] = module, tree
        return f"{type(module).__name__}: {tree!r}", True

    def load_lora() -> tuple[str, bool]:
        adapter = fvt.lora.load(lora_path, base=state["tree"])
        state["adapter"] = adapter
        return f"{adapter!r}, every key matched", len(adapter) > 0

    def layers() -> tuple[str, bool]:
        g = torch.Generator().manual_seed(seed)
        merged = fvt.lora.merge(state["tree"], state["adapter"])
        state["merged"] = merged
        worst = 0.0
        for key, d in state["adapter"].items():
            w = state["tree"][key]
            if w.dim() != 2 or not hasattr(d, "A") or getattr(d, "magnitude", None) is not None:
                continue
            x = torch.randn(3, w.shape[1], generator=g, dtype=torch.float32)
            fly = x @ w.float().T + d.scale * (x @ d.A.float().T) @ d.B.float().T
            ref = x @ merged[key].float().T
            worst = max(worst, float((fly - ref).abs().max() / (ref.abs().max() + 1e-12)))
        tol = 1e-2 if next(iter(state["tree"].values())).dtype in (torch.bfloat16, torch.float16) else 1e-4
        return f"targeted layers, on the fly vs merged: max relative diff {worst:.1e}", worst < tol

    def restore() -> tuple[str, bool]:
        merged, record = fvt.lora.merge_with_record(state["tree"], state["adapter"])
        ok = fvt.lora.restore(merged, record) == state["tree"]
        return f"record {record.nbytes} B vs {record.targets_nbytes} B of targets; bit for bit: {ok}", ok

    def save() -> tuple[str, bool]:
        fvt.save(state["merged"], tmp / "merged", max_shard_size="5GB")
        ok = fvt.load(tmp / "merged") == state["merged"]
        return f"merged model saved to {tmp / 'merged'}", ok

    for name, fn in (("load model (lazy, checked)", load), ("load LoRA strictly", load_lora),
                     ("on the fly vs merged", layers), ("exact restore after merge", restore), ("save merged model", save)):
        step(name, fn)
    report = DemoReport(tuple(steps))
    echo(f"{'all checks passed' if report.ok else 'SOME CHECKS FAILED'} ({len(steps)} steps; files in {tmp})")
    return report
