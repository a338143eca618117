"""The classifier behind `shitu predict` for cls models: top-k from an export, folders, bad files, drawn labels."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.errors import BadInput
from synth import make_class_tree


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny classifier exported by train-cls (one epoch: these tests need a model, not a good one)."""
    from shitu_cli.train.cls import resolve_settings, train_cls

    root = tmp_path_factory.mktemp("classifier")
    make_class_tree(root / "data", n_classes=3, per_class=8, size=40, seed=2)
    settings = resolve_settings("recipes/cls/tiny.yml", {"epochs": 1, "batch_size": 8})
    summary = train_cls(root / "data", root / "run", **settings)
    return summary.export_dir, root / "data"


def test_classify_returns_sorted_topk_probabilities_with_manifest_labels(export):
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.classifier import Classifier

    model_dir, data = export
    classifier = Classifier(model_dir)
    images = [read_image(p) for p in sorted(data.rglob("*.jpg"))[:5]]
    results = classifier.classify(images, topk=2)
    assert len(results) == 5 and all(len(top) == 2 for top in results)
    for top in results:
        assert top[0].score >= top[1].score
        assert {c.label for c in top} <= set(classifier.labels)
        assert classifier.labels[top[0].class_id] == top[0].label
    probabilities = classifier.probabilities(images)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert results[0][0].score == pytest.approx(float(probabilities[0].max()))


def test_predict_cls_walks_folders_skips_bad_files_and_draws(export, tmp_path):
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.classifier import predict_cls

    model_dir, data = export
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = sorted(data.rglob("*.jpg"))[:3]
    for i, path in enumerate(good):
        (inputs / f"{i}.jpg").write_bytes(path.read_bytes())
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    results = list(predict_cls([inputs], model_dir, topk=3, save_vis_dir=tmp_path / "vis"))
    assert [r.path.name for r in results] == ["0.jpg", "1.jpg", "2.jpg", "broken.jpg"]
    assert results[3].error and not results[3].top and results[3].vis_path is None
    for result in results[:3]:
        assert result.ok and len(result.top) == 3
        drawn = read_image(result.vis_path)
        assert drawn.shape == read_image(result.path).shape
        assert not np.array_equal(drawn, read_image(result.path))


def test_predict_cls_refuses_a_missing_path(export, tmp_path):
    from shitu_cli.infer.classifier import predict_cls

    with pytest.raises(BadInput, match="not found"):
        list(predict_cls([tmp_path / "nope.jpg"], export[0]))


def test_unicode_labels_render_as_glyphs_not_boxes():
    from shitu_cli.infer.draw import draw_labels, label_font

    canvas = np.full((80, 160, 3), 200, np.uint8)
    # Missing glyphs all draw as the same box, so two different strings of one length would match.
    greek = draw_labels(canvas, ["Ωμέγα 0.91"])
    cyrillic = draw_labels(canvas, ["Жёлтый 0.91"])
    other_greek = draw_labels(canvas, ["Ψψψψψ 0.91"])
    assert not np.array_equal(greek, other_greek)
    assert not np.array_equal(greek, cyrillic)
    assert (greek[:10, :40] != 200).any()  # the text band sits top-left
    assert label_font("Ωμέγα café", 14).path.endswith("DejaVuSans.ttf")
    assert np.array_equal(canvas, np.full((80, 160, 3), 200, np.uint8))  # the input is left alone
