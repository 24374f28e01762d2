"""Peak memory of a fresh process that loads a model and runs it: what serving it costs.

    python -m airflow_modelopt.container.runtimes.probe '{"path": ..., "format": ..., "threads": 1,
        "batch_sizes": [1, 8], "runs": 3, "feeds": "inputs.npz"}'

prints one JSON line: the RSS high-water mark (``VmHWM`` from /proc/self/status, else
``ru_maxrss``) after loading and running every batch size, the RSS before the model's framework
was imported (the interpreter's own share), and the load time. The benchmark step starts it with
the same interpreter, so imports, allocator and runtime are what a serving process would have.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set, in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int | None:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else None


def probe(request: dict) -> dict:
    baseline = current_rss_bytes()
    import numpy as np

    from airflow_modelopt.container.runtimes import load

    started = time.perf_counter()
    runtime = load(request["path"], request.get("format"), threads=int(request.get("threads", 1)),
                   device=request.get("device", "cpu"), field=request.get("field", "model_uri"))
    load_s = time.perf_counter() - started
    with np.load(request["feeds"], allow_pickle=False) as npz:
        feeds = {k: npz[k] for k in npz.files}
    for batch in request["batch_sizes"]:
        part = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in feeds.items()}
        native = runtime.prepare(part)
        for _ in range(max(1, int(request.get("runs", 3)))):
            runtime.run_native(native)
    result = {
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "after_run_rss_bytes": current_rss_bytes(),
        "load_time_s": load_s,
        "runtime": runtime.runtime_name,
        "frameworks": [m for m in ("torch", "tensorflow", "onnxruntime", "ai_edge_litert", "tensorrt") if m in sys.modules],
    }
    runtime.close()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m airflow_modelopt.container.runtimes.probe '<request JSON>'", file=sys.stderr)
        return 2
    result = probe(json.loads(args[0]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
