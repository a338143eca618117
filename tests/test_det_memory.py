"""`predict --low-memory`: the settings reach onnxruntime's session, the model runs from its low-memory form
with the same boxes, and the backends it cannot use are refused by name. (The memory it saves is measured in
benchmarks/det_memory.md, never asserted.)"""

from __future__ import annotations

import json
from pathlib import Path

from shitu_cli.demo_data import DEMO_DIR

DEMO_DET = DEMO_DIR / "models" / "det"
QUERIES = sorted((DEMO_DIR / "queries" / "images").glob("*.jpg"))[:2]


def test_predict_low_memory_gives_the_default_sessions_boxes_with_the_low_memory_settings(cli, tmp_path):
    import onnxruntime as ort

    from shitu_cli.artifacts import read_yaml
    from shitu_cli.infer.low_memory import WEIGHTS_FILE
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    args = ["predict", *QUERIES, "--det", DEMO_DET, "--det-only", "--backend", "onnxruntime", "--json"]
    default, low = cli(*args), cli(*args, "--low-memory")
    assert default.exit_code == 0 and low.exit_code == 0, low.stderr

    def boxes(result):
        return [(r["label"], round(r["score"], 3), [round(v) for v in r["box"]])
                for image in json.loads(result.stdout)["images"] for r in image["recognitions"]]

    assert boxes(low) == boxes(default) and boxes(low)
    # what --low-memory set up (the form is cached now): auto picks onnxruntime, the session has no arena,
    # no memory pattern and no layout pass, and it runs a form whose weights sit in a side file
    predictor = build_predictor(DEMO_DET, PredictorOptions(backend="auto", low_memory=True), task="det")
    assert predictor.backend == "onnxruntime"
    session = predictor._session.get_session_options()
    assert not session.enable_cpu_mem_arena and not session.enable_mem_pattern
    assert session.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    form = Path(predictor.model_files[0])
    assert (form.parent / WEIGHTS_FILE).stat().st_size > 0.5 * (DEMO_DET / "model.pdiparams").stat().st_size

    # `shitu export --low-memory` writes that form as a model folder and records it: predict runs it so, unasked
    exported = tmp_path / "det-low-memory"
    assert cli("export", DEMO_DET, "-f", "onnx", "--low-memory", "-o", exported).exit_code == 0
    assert read_yaml(exported / "shitu.yaml")["extra"]["low_memory"] is True
    assert (exported / WEIGHTS_FILE).stat().st_size == (form.parent / WEIGHTS_FILE).stat().st_size
    on_device = cli("predict", *QUERIES, "--det", exported, "--det-only", "--json")
    assert boxes(on_device) == boxes(default)
    session = build_predictor(exported, PredictorOptions(backend="auto"), task="det")._session.get_session_options()
    assert not session.enable_cpu_mem_arena and not session.enable_mem_pattern


def test_low_memory_refuses_other_runtimes_by_name(cli, tmp_path):
    result = cli("predict", QUERIES[0], "--det", DEMO_DET, "--det-only", "--backend", "paddle", "--low-memory")
    assert result.exit_code == 2
    assert "--low-memory runs on onnxruntime, not paddle" in result.stderr
    result = cli("export", DEMO_DET, "-f", "openvino", "--low-memory", "-o", tmp_path / "ov")
    assert result.exit_code == 2 and "--low-memory writes an ONNX model" in result.stderr
    assert not (tmp_path / "ov").exists()
