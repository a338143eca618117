"""Each ppdet shim installs once, replaces the upstream function, and fixes the fault it names."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shitu_cli.models import ppdet_compat


@pytest.fixture(scope="module", autouse=True)
def applied():
    ppdet_compat.apply()
    ppdet_compat.apply()  # idempotent: a second call must not wrap the wrappers


def test_every_shim_is_installed_once():
    from PIL import ImageDraw
    from ppdet.modeling import ops
    from ppdet.modeling.assigners.atss_assigner import ATSSAssigner
    from ppdet.modeling.assigners.task_aligned_assigner import TaskAlignedAssigner
    from ppdet.modeling.necks.csp_pan import CSPPAN

    for patched in (ops.multiclass_nms, ATSSAssigner.forward, TaskAlignedAssigner.forward, CSPPAN.__init__):
        assert ppdet_compat.is_shim(patched), patched
        assert not ppdet_compat.is_shim(patched.__wrapped__), "wrapped twice"
    assert hasattr(ImageDraw.ImageDraw, "textsize")


def _nms_inputs():
    import paddle

    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]], np.float32)
    scores = np.array([[[0.9, 0.8, 0.7]]], np.float32)  # [batch, classes, boxes]
    return paddle.to_tensor(boxes), paddle.to_tensor(scores)


def test_multiclass_nms_traces_under_pir_and_matches_dygraph():
    import paddle
    from ppdet.modeling import ops

    def nms(boxes, scores):
        out, count, _ = ops.multiclass_nms(boxes, scores, score_threshold=0.05, nms_top_k=10, keep_top_k=5,
                                           nms_threshold=0.5, normalized=False)
        return out, count

    boxes, scores = _nms_inputs()
    eager_out, eager_count = nms(boxes, scores)
    with ppdet_compat.full_graph_export():
        static = paddle.jit.to_static(nms, full_graph=True)
        static_out, static_count = static(boxes, scores)
    assert int(eager_count.numpy()[0]) == 2  # the overlapping second box is suppressed
    np.testing.assert_allclose(static_out.numpy(), eager_out.numpy(), atol=1e-6)
    assert int(static_count.numpy()[0]) == 2

    def upstream(boxes, scores):
        return ops.multiclass_nms.__wrapped__(boxes, scores, 0.05, 10, 5, 0.5, False)[0]

    with ppdet_compat.full_graph_export(), pytest.raises(Exception, match="multiclass_nms3"):
        paddle.jit.to_static(upstream, full_graph=True)(boxes, scores)  # the fault the shim fixes


def test_full_graph_export_sets_and_restores_the_env(monkeypatch):
    monkeypatch.setenv("ENABLE_FALL_BACK", "True")
    with ppdet_compat.full_graph_export():
        assert os.environ["ENABLE_FALL_BACK"] == "False"
    assert os.environ["ENABLE_FALL_BACK"] == "True"


def test_textsize_is_back():
    from PIL import Image, ImageDraw

    width, height = ImageDraw.Draw(Image.new("RGB", (64, 32))).textsize("mainbody 0.93")
    assert width > height > 0


def test_atss_assigner_accepts_int32_labels():
    import paddle
    from ppdet.modeling.assigners.atss_assigner import ATSSAssigner

    rng = np.random.default_rng(0)
    points = paddle.to_tensor(rng.uniform(8, 56, (20, 2)).astype("float32"))
    anchors = paddle.concat([points - 8, points + 8], -1)
    labels = paddle.to_tensor(np.array([[[1], [2]], [[0], [1]]], "int32"))
    gt_boxes = paddle.to_tensor(np.array([[[0, 0, 30, 30], [20, 20, 60, 60]]] * 2, "float32"))
    mask = paddle.ones([2, 2, 1], "float32")
    assigner = ATSSAssigner(topk=3, num_classes=3)
    with pytest.raises(TypeError, match="promotion"):  # the upstream fault, still there underneath
        ATSSAssigner.forward.__wrapped__(assigner, anchors, [20], labels, gt_boxes, mask, bg_index=3)
    assigned_labels, *_ = assigner(anchors, [20], labels, gt_boxes, mask, bg_index=3)
    assert assigned_labels.dtype == paddle.int64
    assert set(np.unique(assigned_labels.numpy())) <= {0, 1, 2, 3}


def test_csppan_can_be_built_twice_in_one_process():
    import paddle
    from ppdet.modeling.necks.csp_pan import CSPPAN
    from ppdet.modeling.shape_spec import ShapeSpec

    shapes = [ShapeSpec(channels=c) for c in (16, 32, 64)]
    feats = [paddle.rand([1, c, s, s]) for c, s in ((16, 16), (32, 8), (64, 4))]
    for _ in range(2):
        neck = CSPPAN(in_channels=[s.channels for s in shapes], out_channels=16, num_features=4)
        assert len(neck.spatial_scales) == 4
        assert len(neck(feats)) == 4
    assert ppdet_compat.CSPPAN_DEFAULT_SCALES == (0.125, 0.0625, 0.03125)
