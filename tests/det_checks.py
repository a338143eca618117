"""Checks shared by the detector tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_export_matches_dygraph(run: Path, scenes_root: Path, images: int = 2) -> None:
    """The export of a train-det run gives the boxes of the dygraph model it came from, on val scenes.

    Near-equal scores may swap places between kernels, so each of the export's top boxes is matched to the
    closest dygraph box of its class rather than compared row by row."""
    import paddle

    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.train.det import load_trained_model

    detector = Detector(run / "export")
    model = load_trained_model(run)
    for path in sorted((scenes_root / "images").glob("val_*.jpg"))[:images]:
        rgb = read_image(path)
        exported, count = detector.raw(rgb)
        image, scale_factor = detector.preprocess(rgb)
        with paddle.no_grad():
            out = model({"image": paddle.to_tensor(image), "scale_factor": paddle.to_tensor(scale_factor),
                         "im_shape": paddle.to_tensor(np.array([image.shape[2:]], np.float32))})
        dygraph = out["bbox"].numpy()[: int(out["bbox_num"].numpy()[0])]
        exported = exported[: int(count[0])]
        assert len(exported) > 0 and abs(len(exported) - len(dygraph)) <= 2
        for row in exported[np.argsort(-exported[:, 1])][:20]:
            same_class = dygraph[dygraph[:, 0] == row[0]]
            assert np.abs(same_class[:, 1:] - row[1:]).max(axis=1).min() < 1e-2, row
