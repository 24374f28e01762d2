"""The one way latency is timed (``measure``'s timing section), as the ONNX quantization search and
the benchmark step both use it: warm-up until stable, one live model at a time, runs spread over
rounds; and the ONNX model's files found without a session (``runtimes.onnx_backend.onnx_files``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from airflow_modelopt.container import measure


class FakeRuntime:
    """Counts its calls; each call 'takes' the next of ``durations`` ns (the clock is patched)."""

    live: set[str] = set()
    most_live = 0

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.calls = name, log, 0
        FakeRuntime.live.add(name)
        FakeRuntime.most_live = max(FakeRuntime.most_live, len(FakeRuntime.live))
        log.append(f"load {name}")

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(feeds)

    def run_native(self, native: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert self.name in FakeRuntime.live, "ran after close"
        self.calls += 1
        return [native["x"]]

    def close(self) -> None:
        FakeRuntime.live.discard(self.name)
        self.log.append(f"close {self.name}")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    """A fake perf_counter_ns: each run_native call advances it by the next scripted duration."""
    state = {"now": 0, "durations": itertools.repeat(1_000_000)}

    def perf_counter_ns() -> int:
        return state["now"]

    original = FakeRuntime.run_native

    def timed_run(self, native):  # noqa: ANN001, ANN202
        state["now"] += next(state["durations"])
        return original(self, native)

    monkeypatch.setattr(measure.time, "perf_counter_ns", perf_counter_ns)
    monkeypatch.setattr(FakeRuntime, "run_native", timed_run)
    FakeRuntime.live, FakeRuntime.most_live = set(), 0
    return state


def test_warm_up_runs_until_the_time_per_run_is_stable(clock):
    # cold runs get faster, then settle at 1 ms
    clock["durations"] = iter([9_000_000, 6_000_000, 4_000_000, 3_000_000, 2_000_000] + [1_000_000] * 100)
    rt = FakeRuntime("m", [])
    made = measure.warm_up(lambda: rt.run_native({"x": np.zeros(1)}), 2)
    assert made == 10  # runs 8-10 (1, 1, 1 ms) against runs 5-7 (2, 1, 1 ms): both medians 1 ms
    assert rt.calls == made


def test_warm_up_honours_its_minimum_and_zero_means_none(clock):
    rt = FakeRuntime("m", [])
    assert measure.warm_up(lambda: rt.run_native({"x": np.zeros(1)}), 0) == 0
    assert measure.warm_up(lambda: rt.run_native({"x": np.zeros(1)}), 20) == 20  # stable long before: minimum kept


def test_warm_up_gives_up_after_its_time_limit_when_never_stable(clock):
    clock["durations"] = itertools.cycle([1_000_000, 5_000_000, 1_000_000, 9_000_000])  # medians 1, 5, 1, 5 ms
    rt = FakeRuntime("m", [])
    made = measure.warm_up(lambda: rt.run_native({"x": np.zeros(1)}), 3, max_s=0.1)
    assert 3 + 20 <= made <= 3 + 30  # 0.1 s of 4 ms runs (on average) after the 3 asked for


def test_time_batch_times_the_runs_asked_for_after_warm_up(clock):
    rt = FakeRuntime("m", [])
    ns = measure.time_batch(rt, {"x": np.zeros(1)}, 5, 12)
    assert ns == [1_000_000] * 12 and rt.calls >= 5 + 12


def test_time_models_keeps_one_model_alive_and_spreads_runs_over_rounds(clock):
    log: list[str] = []
    ns = measure.time_models(lambda name: FakeRuntime(name, log), ["fp32", "a", "b"], {"x": np.zeros(1)}, 2, 10,
                             rounds=3)
    assert {k: len(v) for k, v in ns.items()} == {"fp32": 10, "a": 10, "b": 10}
    assert FakeRuntime.most_live == 1 and not FakeRuntime.live
    assert log == [f"{what} {name}" for _ in range(3) for name in ("fp32", "a", "b") for what in ("load", "close")]


def test_time_models_closes_the_model_when_a_run_fails(clock, monkeypatch):
    log: list[str] = []

    def broken(self, native):  # noqa: ANN001, ANN202
        raise RuntimeError("no")

    monkeypatch.setattr(FakeRuntime, "run_native", broken)
    with pytest.raises(RuntimeError):
        measure.time_models(lambda name: FakeRuntime(name, log), ["a"], {"x": np.zeros(1)}, 1, 3)
    assert log == ["load a", "close a"]


def test_search_latency_figures_come_from_latency_stats():
    from airflow_modelopt.container.steps.onnx_quantize.search import latency_record, search_rounds

    ns = [3_000_000, 1_000_000, 2_000_000, 4_000_000, 5_000_000]
    rec = latency_record(ns, 1, "median")
    stats = measure.latency_stats(ns, 1)
    assert rec["ms"] == rec["p50_ms"] == stats["latency_ms_p50"] == 3.0
    assert rec["min_ms"] == stats["latency_ms_min"] == 1.0 and rec["mean_ms"] == 3.0 and rec["runs"] == 5
    assert latency_record(ns, 1, "min")["ms"] == 1.0
    assert [search_rounds(n) for n in (3, 15, 20, 30, 100)] == [1, 1, 2, 3, 3]


def _model_with_external_data(folder: Path, *, subgraph: bool) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    if subgraph:  # a weight inside an If branch: only a walk over every tensor finds its file
        branch_w = numpy_helper.from_array(np.full((64,), 2.0, np.float32), "bw")
        then = helper.make_graph([helper.make_node("Add", ["y", "bw"], ["z1"])], "then", [],
                                 [helper.make_tensor_value_info("z1", TensorProto.FLOAT, None)], [branch_w])
        other = helper.make_graph([helper.make_node("Identity", ["y"], ["z2"])], "else", [],
                                  [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))))
        nodes.append(helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("out" if subgraph else "y", TensorProto.FLOAT, None)],
                              [w])
    model = helper.make_model(graph)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    return folder / "model.onnx"


def test_onnx_files_lists_external_data_including_subgraph_weights(tmp_path):
    from airflow_modelopt.container.runtimes.onnx_backend import onnx_files

    path = _model_with_external_data(tmp_path / "m", subgraph=True)
    files = onnx_files(path)
    assert path in files and len(files) == 3  # the graph, w, and the If branch's bw
    assert {f.name for f in files} == {p.name for p in (tmp_path / "m").iterdir()}


def test_the_step_refuses_a_model_whose_external_data_is_missing(tmp_path):
    from airflow_modelopt.container.steps.onnx_quantize.model import inspect_model
    from airflow_modelopt.exceptions import InputError

    path = _model_with_external_data(tmp_path / "m", subgraph=False)
    model = inspect_model(path, "model_uri", "m")
    assert model.bytes == sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    (tmp_path / "m" / "w").unlink()
    with pytest.raises(InputError, match=r"model_uri: model.onnx keeps its weights in external data \['w'\]"):
        inspect_model(path, "model_uri", "m")
