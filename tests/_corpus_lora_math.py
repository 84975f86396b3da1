"""Hostile LoRA files for the LoRA math: LyCORIS LoHa/LoKr misfits, bad alphas, DoRA magnitudes, factor dtypes, overflow."""

from __future__ import annotations

from pathlib import Path

import torch

import fvtransform as fvt
from fvtransform import errors as E

from _corpus import Case

_BASE = {"l.weight": torch.zeros(4, 3), "c.weight": torch.zeros(4, 2, 3, 3)}


def _load(p: Path) -> object:
    return fvt.lora.load(p, base=fvt.ParamTree(_BASE))


def cases(root: Path) -> list[Case]:
    out: list[Case] = []

    def lora(name: str, tensors: dict[str, torch.Tensor], error: type, match: str) -> None:
        path = root / f"{name}.safetensors"
        fvt.save(fvt.ParamTree({f"diffusion_model.{k}": v for k, v in tensors.items()}), path)
        out.append(Case(name, path, error, rf"{name}\.safetensors.*{match}", _load))

    ones = torch.ones
    loha = {"l.hada_w1_a": ones(4, 2), "l.hada_w1_b": ones(2, 3), "l.hada_w2_a": ones(4, 2), "l.hada_w2_b": ones(2, 3)}
    lora("loha_misfit", {**loha, "l.hada_w1_b": ones(2, 5), "l.hada_w2_b": ones(2, 5)}, E.ShapeMismatchError, r"l\.weight.*does not fit the base weight \[4, 3\]")
    lora("loha_halves_differ", {**loha, "l.hada_w2_a": ones(3, 2)}, E.ShapeMismatchError, r"l\.hada_w1_a.*Hadamard halves")
    lora("loha_tucker_kernel", {"c.hada_w1_a": ones(2, 4), "c.hada_w1_b": ones(2, 2), "c.hada_w2_a": ones(2, 4), "c.hada_w2_b": ones(2, 2),
                                "c.hada_t1": ones(2, 2, 3, 3), "c.hada_t2": ones(2, 2, 1, 9)}, E.ShapeMismatchError, r"c\.hada_t1.*kernel dims")
    lora("lokr_rank_mismatch", {"l.lokr_w1": ones(2, 1), "l.lokr_w2_a": ones(2, 2), "l.lokr_w2_b": ones(3, 3)}, E.ShapeMismatchError,
         r"l\.lokr_w1.*rank mismatch: lokr_w2_a \[2, 2\] @ lokr_w2_b \[3, 3\]")
    lora("lokr_misfit", {"l.lokr_w1": ones(2, 1), "l.lokr_w2": ones(2, 2)}, E.ShapeMismatchError, r"l\.weight.*LoKr.*does not fit")
    lora("lycoris_alpha_zero", {**loha, "l.alpha": torch.tensor(0.0)}, E.FormatError, r"l\.alpha' is 0")
    lora("lycoris_alpha_inf", {**loha, "l.alpha": torch.tensor(float("inf"))}, E.NumericError, r"l\.alpha' is inf")
    lora("lycoris_alpha_vector", {**loha, "l.alpha": ones(3)}, E.FormatError, r"l\.alpha' must be one real number")
    lora("loha_rank_zero", {**loha, "l.hada_w2_a": ones(4, 0), "l.hada_w2_b": ones(0, 3)}, E.ShapeMismatchError,
         r"l\.hada_w1_a.*rank 0 in \['hada_w2_b'\]")
    lora("lokr_rank_zero", {"l.lokr_w1": ones(2, 1), "l.lokr_w2_a": ones(2, 0), "l.lokr_w2_b": ones(0, 3)}, E.ShapeMismatchError,
         r"l\.lokr_w1.*rank 0 in \['lokr_w2_b'\]")
    lora("lokr_ranks_differ", {"l.lokr_w1_a": ones(2, 1), "l.lokr_w1_b": ones(1, 1), "l.lokr_w2_a": ones(2, 2), "l.lokr_w2_b": ones(2, 3),
                               "l.alpha": torch.tensor(2.0)}, E.FormatError, r"ranks 1 .*and 2 .*LyCORIS divides alpha by 1, ComfyUI by 2")
    lora("loha_lokr_mixed", {**loha, "l.lokr_w1": ones(2, 1)}, E.FormatError, r"both LoHa .* and LoKr")
    lora("loha_nan", {**loha, "l.hada_w2_b": torch.full((2, 3), float("nan"))}, E.NumericError, r"hada_w2_b holds NaN")
    lora("dora_wrong_length", {"l.lora_down.weight": ones(2, 3), "l.lora_up.weight": ones(4, 2), "l.dora_scale": ones(5, 1)},
         E.ShapeMismatchError, r"l\.dora_scale.*fits neither")
    lora("dora_input_axis_wrong_length", {**loha, "l.dora_scale": ones(1, 4)}, E.ShapeMismatchError, r"l\.dora_scale.*fits neither")
    lora("lora_complex", {"l.lora_A.weight": ones(2, 3, dtype=torch.complex64), "l.lora_B.weight": ones(4, 2)}, E.ShapeMismatchError,
         r"'l\.weight' A is complex")
    lora("lora_fp8_nan", {"l.lora_A.weight": torch.full((2, 3), float("nan")).to(torch.float8_e4m3fn), "l.lora_B.weight": ones(4, 2)},
         E.NumericError, r"'l\.weight' A holds NaN")
    lora("lora_conv_kernel_misfit", {"c.lora_A.weight": ones(2, 2, 1, 9), "c.lora_B.weight": ones(4, 2, 1, 1)}, E.ShapeMismatchError,
         r"c\.weight.*A \[2, 2, 1, 9\].*\[4, 2, 3, 3\]")

    # a merge that overflows float16: a NumericError naming the base file and the key, and no output left behind
    base = root / "fp16_base.safetensors"
    fvt.save(fvt.ParamTree({"l.weight": torch.full((4, 3), 60000.0, dtype=torch.float16)}), base)
    big = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.full((1, 3), 100.0), torch.full((4, 1), 100.0), 1.0)})
    out.append(Case("merge_overflows_fp16", base, E.NumericError, r"fp16_base\.safetensors: 'l\.weight'.*overflow",
                    lambda p: fvt.lora.merge_checkpoint(p, big, p.parent / "fp16_out.safetensors")))
    return out
