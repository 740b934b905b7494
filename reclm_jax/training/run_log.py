"""What a training run reports: a progress bar, a JSONL log, TensorBoard events, throughput and MFU.

    log = RunLog(out_dir, total_steps=1000, start_step=0)
    log.step(step, {"loss": 1.2, "lr": 1e-3}, tokens=4096, flops=...)   # every optimiser step
    log.scalars(step, {"valid/seqrec/NDCG@K": 0.1})                      # anything else (validation)
    log.close()

`<out_dir>/log.jsonl` gets one JSON object per call ({"step", "time", **scalars}); a run resumed at step s
first drops the records after s (it writes those steps again), so every step appears once; TensorBoard event files go
to `<out_dir>/tensorboard`. Only process 0 writes (every process must still call, with the same values).
Per step, throughput is measured between consecutive `step` calls (the first step after a (re)start includes
compilation and is not reported): tokens/s in total and per device, and the model FLOP utilisation
MFU = achieved FLOP/s per device / the device's peak (`peak_flops`, bf16 dense, by device kind).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import jax
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


# Peak dense bf16 FLOP/s per device by `jax.Device.device_kind` (the vendors' data sheets, no sparsity).
PEAK_FLOPS = {
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device: Any = None, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override` if given, else the table by device kind; None if unknown
    (CPUs, unlisted accelerators), in which case MFU is not reported."""
    if override is not None:
        return override
    kind = (device or jax.devices()[0]).device_kind
    return PEAK_FLOPS.get(kind)


class RunLog:
    """Progress bar + JSONL + TensorBoard for one run (see the module docstring)."""

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, *, progress: bool = True,
                 peak: float | None = None, description: str = "train"):
        self.enabled = jax.process_index() == 0
        self.num_devices = jax.device_count()
        self.peak = peak
        self._last_time: float | None = None
        self._file = self._writer = self._bar = None
        if not self.enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "log.jsonl"
        if path.is_file():  # a resumed run writes the steps after its checkpoint again: keep each step once
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

        self._writer = SummaryWriter(str(out / "tensorboard"))
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True)

    def step(self, step: int, scalars: Mapping[str, float], *, tokens: int, flops: float | None = None) -> dict:
        """Log one optimiser step that processed `tokens` tokens and, if known, `flops` model FLOPs.
        Returns the scalars written (with the step time, and tokens/s, tokens/s/device and MFU once measurable)."""
        now = time.perf_counter()
        out = dict(scalars)
        if self._last_time is not None:
            dt = now - self._last_time
            out["step_time_s"] = dt
            if tokens:  # a stage whose step counts no tokens (the teacher) gets no throughput, not "0 tok/s"
                out["tokens_per_s"] = tokens / dt
                out["tokens_per_s_per_device"] = tokens / dt / self.num_devices
            if flops is not None:
                per_device = flops / dt / self.num_devices
                out["tflops_per_device"] = per_device / 1e12
                if self.peak:
                    out["mfu"] = per_device / self.peak
        self._last_time = now
        self.scalars(step, out)
        if self._bar is not None:
            shown = {"loss": f"{out['loss']:.4f}"} if "loss" in out else {}
            if "tokens_per_s" in out:
                shown["tok/s"] = f"{out['tokens_per_s']:.0f}"
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        return out

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write scalars without touching the throughput clock (validation, events)."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def pause(self) -> None:
        """Exclude the time until the next `step` (validation, checkpointing) from the throughput."""
        self._last_time = None

    def write(self, message: str) -> None:
        """A message line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()


def _plain(v: Any) -> Any:
    return float(v) if hasattr(v, "item") and not isinstance(v, (int, float)) else v
