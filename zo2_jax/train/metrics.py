"""Run metrics: a JSONL log (and TensorBoard events when installed), memory probes, a PNG plot."""

from __future__ import annotations

import json
import os
import resource
from typing import Optional

import jax


def device_memory() -> dict:
    """Current and peak bytes in use on the default device ({} where the backend keeps none)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def host_memory() -> dict:
    """Resident set size of this process, now and at its peak, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = peak
    return {"host_rss_bytes": rss, "host_peak_rss_bytes": peak}


class MetricsLog:
    """Appends one JSON object per record to `out_dir/metrics.jsonl` (and TensorBoard if present).

    Opening an existing log for a resumed run first drops records from steps at or after the
    resume point, so the file never holds two versions of one step.
    """

    def __init__(self, out_dir: str, resume_step: Optional[int] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as fh:
                keep = [line for line in fh if line.strip()
                        and json.loads(line).get("step", -1) < resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(keep)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self._fh = open(self.path, "a")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter  # optional
            self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot(metrics_path: str, out_png: str) -> str:
    """Loss per step (and its running mean) beside evaluation accuracy, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        ax1.plot(steps, loss, alpha=0.35, label="loss")
        w = max(1, len(loss) // 20)
        if len(loss) >= w:
            ax1.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"),
                     label=f"running mean ({w})")
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss")
        ax1.legend()
    if evals:
        ax2.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-")
        ax2.set_xlabel("step")
        ax2.set_ylabel("evaluation accuracy")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
