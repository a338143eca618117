"""Tiny trained run dirs for the compress tests, laid out like `shitu train-cls` output:
recipe.yaml (options.model, options.input_size), checkpoints/best.pdparams and export/ (softmax head).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.synth import make_class_tree


def make_cls_dataset(root: Path, n_classes: int = 4, per_class: int = 12, size: int = 48) -> tuple[Path, list[str]]:
    names = make_class_tree(root, n_classes, per_class, size=size, seed=3)
    lines = [f"{p.relative_to(root).as_posix()} {names.index(p.parent.name)}\n"
             for p in sorted(root.rglob("*.jpg"))]
    (root / "all.txt").write_text("".join(lines), encoding="utf-8")
    (root / "labels.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return root / "all.txt", names


def train_cls_run(run_dir: Path, data_root: Path, names: list[str], arch: str = "PPLCNet_x0_25", size: int = 48,
                  epochs: int = 12) -> Path:
    """Train `arch` a few epochs on the class tree and write a run dir like train-cls does."""
    import paddle

    from shitu_cli.data.images import read_image
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest
    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.recipes import Recipe, write_recipe
    from shitu_cli.train.loop import LoopConfig, fit, seed_everything

    seed_everything(0)
    manifest = ModelManifest(task="cls", arch=arch, input_size=(size, size), model_file="", params_file="", labels=names)
    paths = sorted(data_root.rglob("*.jpg"))
    images = preprocess_batch([read_image(p) for p in paths], manifest.preprocess, manifest.input_size)
    labels = np.array([names.index(p.parent.name) for p in paths], np.int64)
    model = build_arch({"name": arch, "class_num": len(names)})

    def make_loader(epoch):
        order = np.random.permutation(len(images))
        for start in range(0, len(order), 8):
            idx = order[start : start + 8]
            yield paddle.to_tensor(images[idx]), paddle.to_tensor(labels[idx])

    def loss_fn(m, batch):
        return paddle.nn.functional.cross_entropy(m(batch[0]), batch[1]), {}

    config = LoopConfig(epochs=epochs, lr=0.05, weight_decay=1e-4, warmup_epochs=0.5, ema_decay=None, seed=1)
    steps = (len(images) + 7) // 8
    fit(model, make_loader, steps, loss_fn, None, config, run_dir, batch_size=8)

    class WithSoftmax(paddle.nn.Layer):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return paddle.nn.functional.softmax(self.net(x), axis=-1)

    export_layer(WithSoftmax(model), run_dir / "export", [(None, 3, size, size)], manifest)
    recipe = Recipe(command="train-cls", core="shitu_cli.train.cls:train_cls", options={"model": arch, "input_size": size})
    write_recipe(run_dir, recipe, [])
    return run_dir
