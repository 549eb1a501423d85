"""Peak dense TFLOP/s of the accelerators MFU is reported for, by the math the matrix multiplies run in.

Vendor data-sheet figures without sparsity, per device as the runtime counts devices (a CUDA GPU; a TPU chip,
except v3 and v7, whose two TensorCores are two devices). MFU = model FLOPs per second / (devices x peak); TPUs are
quoted against their bf16 peak whatever the input dtype, as their MXUs multiply in bf16 passes.
"""
from __future__ import annotations

# (name fragment as the device reports it, lower case) -> {math: TFLOP/s}; the first fragment that matches wins,
# so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("a100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("h100 pcie", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0}),
    ("h100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),  # SXM; "NVIDIA H100 80GB HBM3"
    ("h200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}),
    ("b200", {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0}),
    ("tpu v3", {"bf16": 61.5}),  # per TensorCore (123 a chip)
    ("tpu v4", {"bf16": 275.0}),
    ("tpu v5litepod", {"bf16": 197.0}),  # v5e as torch_xla names it
    ("tpu v5 lite", {"bf16": 197.0}),
    ("tpu v5e", {"bf16": 197.0}),  # as TorchTPU names it
    ("tpu v5p", {"bf16": 459.0}),
    ("tpu v6", {"bf16": 918.0}),  # v6e (Trillium): "TPU v6e", "TPU v6 lite"
    ("tpu v7", {"bf16": 1153.5}),  # per TensorCore (Ironwood: 2307 a chip)
)


def matmul_math(device_kind: str, precision: str, matmul_precision: str) -> str:
    """The math a run's matrix multiplies use: bf16 under autocast (fp16 has bf16's peak), on TPUs always bf16,
    else fp32 at 'highest' and TF32 (or bf16 at 'medium') on NVIDIA GPUs."""
    if precision in ("bf16", "fp16") or device_kind in ("xla", "tpu"):
        return "bf16"
    return {"highest": "fp32", "high": "tf32", "medium": "bf16"}[matmul_precision]


def peak_tflops(device_name: str, math: str) -> float | None:
    """The table's peak for ``device_name`` (e.g. "NVIDIA H200", "TPU v4-32") in ``math``; None when unknown."""
    name = device_name.lower()
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks.get(math)
    return None
