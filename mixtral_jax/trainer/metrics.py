"""Training metrics: per-step values from the train step, aggregated every `log_every` steps.

Written to TensorBoard event files (tensorboardX) and `metrics.jsonl` in the workdir, and shown in a
tqdm progress bar. `MetricsLogger.record(step, metrics)` is called with step N-1's device metrics
right after step N is dispatched, so reading them back overlaps step N's computation (nanodo-style).

Non-finite values are kept: in metrics.jsonl as the strings "NaN", "Infinity" and "-Infinity"
(JSON has no such numbers; Python's float() reads the strings back).
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, by (a prefix of) jax's device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12,
}
# CPU estimate: ~50 GFLOP/s of float32 per core (AVX2/AVX-512 FMA at a sustained clock), counted
# per host core, not per (possibly fake) CPU device. A rough number: CPU MFU is only indicative.
CPU_FLOPS_PER_CORE = 50e9


def _peak_memory_bytes():
  """The first local device's peak bytes in use so far (GPU/TPU), or None where not reported."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (backends without memory stats)
    return None
  return (stats or {}).get("peak_bytes_in_use")


def peak_flops_per_second() -> float:
  """Peak FLOP/s of all devices of the job (0.0 when the device kind is unknown)."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) * jax.process_count()
  kind = dev.device_kind
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix] * jax.device_count()
  return 0.0


# Checked every step: the first of these (then any other scalar) that is not finite stops training.
WATCHED = ("loss", "grad_norm")


def first_nonfinite(metrics: dict) -> str | None:
  """Name of the first non-finite scalar of one step's host metrics (loss, grad_norm first)."""
  names = [k for k in WATCHED if k in metrics] + sorted(
      k for k in metrics if k not in WATCHED and np.ndim(metrics[k]) == 0)
  for k in names:
    if not np.isfinite(np.asarray(metrics[k], np.float64)):
      return k
  return None


def json_value(v: float):
  """A float as JSON: finite values as numbers, NaN/inf as "NaN"/"Infinity"/"-Infinity"."""
  if math.isfinite(v):
    return v
  return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


class MetricsLogger:
  """Aggregates step metrics and writes them every `log_every` steps (and at the last step).

  Input per step (dict of device arrays): scalars such as loss, lm_loss, aux_loss/*, grad_norm
  (averaged over the interval), lr (the logged step's), task_correct/task_count/task_seq_correct/
  task_seq_count f32[num_tasks] and load f32[L_moe, E] (summed over the interval).
  Output keys: those scalars; accuracy/<task> (answer tokens, loss_mask) and seq_accuracy/<task>
  (examples with every answer token right) for tasks seen in the interval; router/load_max_over_min
  (worst MoE layer), router/max_expert_fraction, router/min_expert_fraction; tokens_per_second
  (all batch positions, padding included) and mfu (6 * active params per token; no attention FLOPs);
  memory/peak_gib (the first device's peak bytes in use so far, where reported: GPU, TPU).
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, log_every: int,
               task_names, tokens_per_step: int, flops_per_token: float, peak_flops: float,
               enabled: bool = True, progress: bool = True):
    self.total_steps = total_steps
    self.log_every = log_every
    self.task_names = list(task_names)
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.enabled = enabled
    self.last: dict = {}
    self._reset()
    self._t0 = None  # starts after the first step (which includes compilation)
    self._timed_steps = 0
    self._writer = None
    self._jsonl = None
    self._bar = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if progress:
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

  def _reset(self):
    self._sums: dict = {}
    self._last: dict = {}
    self._n = 0

  def record(self, step: int, metrics) -> str | None:
    """Adds the metrics of the step that brought the state to `step` (blocks until it is done).

    Returns the name of the first non-finite scalar of this step (that step's line is then written
    at once, with the bad value), else None.
    """
    m = jax.device_get(metrics)
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._timed_steps = now, 0
    else:
      self._timed_steps += 1
    for k, v in m.items():
      v = np.asarray(v, np.float64)
      self._sums[k] = self._sums[k] + v if k in self._sums else v
    self._n += 1
    self._last = m
    if self._bar is not None:
      self._bar.update(1)
    bad = first_nonfinite(m)
    if bad is not None or step % self.log_every == 0 or step == self.total_steps:
      self._write(step, now)
    return bad

  def flush(self, step: int):
    """Writes the steps recorded since the last line (a run stopping between log steps)."""
    if self._n:
      self._write(step, time.perf_counter())

  def _write(self, step, now):
    s, n = self._sums, max(self._n, 1)
    out = {}
    for k, v in s.items():
      if k.startswith("task_") or k == "load":
        continue
      out[k] = float(v) / n
    if "lr" in self._last:
      out["lr"] = float(self._last["lr"])  # the rate of the logged step, not the interval mean
    for i, name in enumerate(self.task_names):
      if "task_count" in s and s["task_count"][i] > 0:
        out[f"accuracy/{name}"] = float(s["task_correct"][i] / s["task_count"][i])
      if "task_seq_count" in s and s["task_seq_count"][i] > 0:
        out[f"seq_accuracy/{name}"] = float(s["task_seq_correct"][i] / s["task_seq_count"][i])
    if "load" in s and s["load"].size:
      load_LE = s["load"]
      frac_LE = load_LE / np.maximum(load_LE.sum(-1, keepdims=True), 1e-9)
      # Worst layer's spread; an expert with no tokens counts as one token (keeps it finite).
      spread_L = load_LE.max(-1) / np.maximum(load_LE.min(-1), 1.0)
      out["router/load_max_over_min"] = float(spread_L.max())
      out["router/max_expert_fraction"] = float(frac_LE.max())
      out["router/min_expert_fraction"] = float(frac_LE.min())
    dt = now - self._t0 if self._t0 is not None else 0.0
    if self._timed_steps > 0 and dt > 0:
      tps = self._timed_steps * self.tokens_per_step / dt
      out["tokens_per_second"] = tps
      if self.peak_flops > 0:
        out["mfu"] = tps * self.flops_per_token / self.peak_flops
    peak = _peak_memory_bytes()
    if peak:
      out["memory/peak_gib"] = peak / 2 ** 30
    self._t0, self._timed_steps = now, 0
    self.last = {"step": step, **out}
    self._reset()
    if not self.enabled:
      return
    for k, v in out.items():
      self._writer.add_scalar(k, v, step)
    self._writer.flush()
    self._jsonl.write(json.dumps({k: json_value(v) for k, v in self.last.items()}) + "\n")
    self._jsonl.flush()
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4f}",
                            lr=f"{out.get('lr', 0.0):.2e}", refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
