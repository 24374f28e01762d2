"""The timing cache: read from ``timing_cache_uri`` (an earlier build's ``timing_cache`` artifact),
attached to the builder config (a fresh one when none is given or TensorRT rejects it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airflow_modelopt.exceptions import InputError, StepFailed

TIMING_CACHE_FILE = "timing.cache"
CALIBRATION_CACHE_FILE = "calibration.cache"


def read_timing_cache(path: Path | None, uri: str | None) -> bytes | None:
    if path is None:
        return None
    if path.is_dir():
        named = path / TIMING_CACHE_FILE
        found = [named] if named.is_file() else sorted(path.rglob("*.cache"))
        found = [p for p in found if p.name != CALIBRATION_CACHE_FILE]
        if len(found) != 1:
            raise InputError(
                f"timing_cache_uri: {uri} is a folder with {len(found)} timing cache files; expected {TIMING_CACHE_FILE} "
                "(the timing_cache artifact of an earlier tensorrt_build)"
            )
        path = found[0]
    data = path.read_bytes()
    if not data:
        raise InputError(f"timing_cache_uri: {uri} is an empty file")
    return data


def attach_timing_cache(trt: Any, config: Any, data: bytes | None, out: logging.Logger) -> bool:
    """Start from the given timing cache; a fresh one if none or TensorRT rejects it. True when reused."""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            out.info("Reusing timing cache (%d bytes)", len(data))
            return True
        out.warning("TensorRT rejected the given timing cache (built by another TensorRT version or GPU?); "
                    "starting from an empty one")
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise StepFailed("TensorRT did not accept an empty timing cache")
    return False


__all__ = ["CALIBRATION_CACHE_FILE", "TIMING_CACHE_FILE", "attach_timing_cache", "read_timing_cache"]
