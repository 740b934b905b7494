"""The accelerators `reclm-jax plan` plans for: peak bf16 FLOP/s, memory and bandwidth per device, from the
vendors' data sheets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    usable: float  # fraction of HBM a JAX process gets by default
    source: str


# JAX preallocates 75 % of GPU memory (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX docs, "GPU memory allocation")
_GPU_FRACTION = 0.75
ACCELERATORS = {
    "a100-40gb": Accelerator("NVIDIA A100-SXM4-40GB", 312e12, 40e9, 1.555e12, _GPU_FRACTION,
                             "NVIDIA A100 Tensor Core GPU datasheet (bf16 dense 312 TFLOPS, 40 GB HBM2 1555 GB/s)"),
    "a100-80gb": Accelerator("NVIDIA A100-SXM4-80GB", 312e12, 80e9, 2.039e12, _GPU_FRACTION,
                             "NVIDIA A100 datasheet (bf16 dense 312 TFLOPS, 80 GB HBM2e 2039 GB/s)"),
    "h100-80gb": Accelerator("NVIDIA H100 SXM5 80GB", 989e12, 80e9, 3.35e12, _GPU_FRACTION,
                             "NVIDIA H100 datasheet, SXM (bf16 dense 989 TFLOPS, 80 GB HBM3 3.35 TB/s)"),
    "l4": Accelerator("NVIDIA L4", 121e12, 24e9, 0.3e12, _GPU_FRACTION,
                      "NVIDIA L4 datasheet (bf16 dense 121 TFLOPS, 24 GB GDDR6 300 GB/s)"),
    "tpu-v4": Accelerator("TPU v4 (per chip)", 275e12, 32e9, 1.2e12, 1.0,
                          "cloud.google.com/tpu/docs/v4 (275 TFLOPS bf16, 32 GiB HBM2 1200 GB/s)"),
    "tpu-v5e": Accelerator("TPU v5e (per chip)", 197e12, 16e9, 0.819e12, 1.0,
                           "cloud.google.com/tpu/docs/v5e (197 TFLOPS bf16, 16 GB HBM2 819 GB/s)"),
    "tpu-v5p": Accelerator("TPU v5p (per chip)", 459e12, 95e9, 2.765e12, 1.0,
                           "cloud.google.com/tpu/docs/v5p (459 TFLOPS bf16, 95 GB HBM2e 2765 GB/s)"),
    "tpu-v6e": Accelerator("TPU v6e (per chip)", 918e12, 32e9, 1.64e12, 1.0,
                           "cloud.google.com/tpu/docs/v6e (918 TFLOPS bf16, 32 GB HBM 1640 GB/s)"),
}
