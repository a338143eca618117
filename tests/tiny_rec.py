"""A tiny untrained rec model exported like `shitu train-rec` exports one: a real model dir on disk.

An untrained net still maps an image to the same features every time, which is all that
"gallery images recognise as themselves" needs.
"""

from __future__ import annotations

from pathlib import Path


def export_tiny_rec(out_dir: Path, embedding_dim: int = 64, input_size: int = 64, seed: int = 0) -> Path:
    import paddle

    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest, Preprocess
    from shitu_cli.models.ppcls import build_arch

    paddle.seed(seed)
    net = build_arch({
        "name": "RecModel",
        "Backbone": {"name": "PPLCNet_x0_25", "pretrained": False},
        "BackboneStopLayer": {"name": "flatten"},
        "Neck": {"name": "FC", "embedding_size": 1280, "class_num": embedding_dim},
    })

    class Features(paddle.nn.Layer):
        """RecModel returns a dict; the exported model returns the raw features only."""

        def __init__(self, rec):
            super().__init__()
            self.rec = rec

        def forward(self, x):
            return self.rec(x)["features"]

    manifest = ModelManifest(task="rec", arch="RecModel/PPLCNet_x0_25", input_size=(input_size, input_size),
                             model_file="", params_file="", preprocess=Preprocess(), embedding_dim=embedding_dim)
    return export_layer(Features(net), Path(out_dir), [[None, 3, input_size, input_size]], manifest)
