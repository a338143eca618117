"""Paddle 3.3.1 runs official-style legacy models (inference.pdmodel + .pdiparams) pulled through the cache."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from shitu_cli.models.registry import BASE_URL_ENV, OFFICIAL_MODELS, resolve_model_dir
from tests.model_server import ModelServer


def _legacy_multiply(paddle):
    """paddle.multiply only accepts PIR values in paddle 3.3; old-IR tracing needs the elementwise_mul op."""
    from paddle.base.framework import Variable
    from paddle.base.layer_helper import LayerHelper
    from paddle.tensor.math import _elementwise_op

    original = paddle.multiply

    def multiply(x, y, name=None):
        if isinstance(x, Variable) or isinstance(y, Variable):
            return _elementwise_op(LayerHelper("elementwise_mul", x=x, y=y, axis=-1, name=name))
        return original(x, y, name=name)

    return multiply


@pytest.fixture(scope="module")
def legacy_classifier(tmp_path_factory):
    """A PP-LCNet x0_25 (ImageNet head) saved the 2022 way, tarred like PaddleClas's official *_infer.tar."""
    import paddle
    from paddle.static import InputSpec

    from shitu_cli.models.ppcls import build_arch

    paddle.seed(11)
    model = build_arch({"name": "PPLCNet_x0_25", "class_num": 1000})
    model.eval()
    out = tmp_path_factory.mktemp("legacy") / "PPLCNet_x0_25_infer"
    mp = pytest.MonkeyPatch()
    mp.setattr(paddle, "multiply", _legacy_multiply(paddle))
    try:
        with paddle.pir_utils.OldIrGuard():
            paddle.jit.save(model, str(out / "inference"), input_spec=[InputSpec([None, 3, 224, 224], "float32", "x")])
    finally:
        mp.undo()
    assert sorted(p.name for p in out.iterdir()) == ["inference.pdiparams", "inference.pdiparams.info", "inference.pdmodel"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(out, arcname=out.name)
    return model, buffer.getvalue()


def test_pulled_legacy_model_matches_dygraph(cli, monkeypatch, legacy_classifier):
    import paddle

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    model, archive = legacy_classifier
    server = ModelServer(files={"/" + OFFICIAL_MODELS["PPLCNet_x0_25"].url_path: archive}).start()
    monkeypatch.setenv(BASE_URL_ENV, server.base_url)
    try:
        result = cli("models", "pull", "PPLCNet_x0_25")
    finally:
        server.stop()
    assert result.exit_code == 0, result.stderr

    model_dir = resolve_model_dir("PPLCNet_x0_25")
    assert (model_dir / "inference.pdmodel").is_file()
    assert not (model_dir / "inference.pdiparams.info").exists()  # pickled training metadata: never kept
    images = np.random.default_rng(0).normal(0, 1, (2, 3, 224, 224)).astype("float32")
    with paddle.no_grad():
        expected = model(paddle.to_tensor(images)).numpy()
    for mkldnn in (False, True):
        predictor = build_predictor(model_dir, PredictorOptions(mkldnn=mkldnn), task="cls")
        [logits] = predictor.run(images)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4, err_msg=f"mkldnn={mkldnn}")
        assert len(predictor.manifest.labels) == logits.shape[1] == 1000


def test_shitu_export_added_under_its_own_name(cli, tmp_path):
    """A model exported by shitu (paddle-3 inference.json + shitu.yaml) registers under any name."""
    import paddle

    from shitu_cli.infer.predictor import build_predictor
    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest
    from shitu_cli.models.ppcls import build_arch

    paddle.seed(3)
    model = build_arch({"name": "PPLCNet_x0_25", "class_num": 3})
    manifest = ModelManifest(task="cls", arch="PPLCNet_x0_25", input_size=(32, 32), model_file="", params_file="",
                             labels=["a", "b", "c"])
    export_layer(model, tmp_path / "export", [(None, 3, 32, 32)], manifest)
    result = cli("models", "add", tmp_path / "export", "--name", "my-cls")
    assert result.exit_code == 0, result.stderr

    listed = cli("models", "list")
    assert "my-cls" in listed.stdout
    images = np.random.default_rng(1).normal(0, 1, (1, 3, 32, 32)).astype("float32")
    with paddle.no_grad():
        expected = model(paddle.to_tensor(images)).numpy()
    [logits] = build_predictor(resolve_model_dir("my-cls"), task="cls").run(images)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_weights_load_without_unpickling_code(tmp_path):
    """Official .pdparams are pickles; load_weights reads their arrays and refuses anything else."""
    import os
    import pickle

    import paddle

    from shitu_cli.errors import BadInput
    from shitu_cli.models.legacy import load_weights
    from shitu_cli.models.ppcls import build_arch

    paddle.seed(5)
    source = build_arch({"name": "PPLCNet_x0_25", "class_num": 4})
    paddle.save(source.state_dict(), str(tmp_path / "w.pdparams"))
    paddle.seed(6)
    target = build_arch({"name": "PPLCNet_x0_25", "class_num": 4})
    target.set_state_dict(load_weights(tmp_path / "w.pdparams"))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pdparams").write_bytes(pickle.dumps({"w": Exploit()}))
    with pytest.raises(BadInput, match="refused global"):
        load_weights(tmp_path / "evil.pdparams")
    assert not marker.exists()
    (tmp_path / "cut.pdparams").write_bytes((tmp_path / "w.pdparams").read_bytes()[:100])
    with pytest.raises(BadInput, match="not a readable"):
        load_weights(tmp_path / "cut.pdparams")
