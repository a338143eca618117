"""train-rec evaluation: eval-mode embeddings, precise BatchNorm statistics, recall@k and mAP on
gallery/query."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from shitu_cli.data.loader import LabeledImage, load_batches, sequential_batches
from shitu_cli.train.rec_data import RecData
from shitu_cli.train.rec_settings import RecSettings

EVAL_CACHE_BYTES = 256 << 20  # decode the eval images once when they fit in this much memory
CALIBRATION_IMAGES = 256  # training images that set the BN statistics of evaluated/exported weights


class Embedder:
    """Eval-mode embeddings for a list of images, with the inference preprocessing."""

    def __init__(self, samples: list[LabeledImage], settings: RecSettings):
        from shitu_cli.models.manifest import Preprocess

        self.samples = samples
        self.preprocess = Preprocess(resize="direct")
        self.size = (settings.input_size, settings.input_size)
        self.batch_size = settings.eval_batch_size
        self.num_workers = settings.num_workers
        fits = len(samples) * 3 * self.size[0] * self.size[1] * 4 <= EVAL_CACHE_BYTES
        self._cache = list(self._batches()) if fits else None

    def batches(self):
        """(images, labels) batches: from memory when they fit, else decoded again."""
        if self._cache is not None:
            return self._cache
        return self._batches()

    def _batches(self):
        order = sequential_batches(len(self.samples), self.batch_size)
        return load_batches(self.samples, order, self.preprocess, self.size, num_workers=self.num_workers)

    def __call__(self, model) -> tuple[np.ndarray, np.ndarray]:
        import paddle

        model.eval()
        features, labels = [], []
        with paddle.no_grad():
            for images, batch_labels in self.batches():
                features.append(model(paddle.to_tensor(images))["features"].numpy())
                labels.append(batch_labels)
        return np.concatenate(features), np.concatenate(labels)


def calibration_images(data: RecData, settings: RecSettings) -> Embedder:
    """A seeded sample of training images (eval preprocessing) for `calibrate_batch_norm`."""
    order = np.random.default_rng([settings.seed, 7]).permutation(len(data.train))[:CALIBRATION_IMAGES]
    return Embedder([data.train[i] for i in sorted(order)], settings)


def calibrate_batch_norm(model, images: Embedder) -> None:
    """Precise BN: set every BatchNorm's running mean/variance to the exact average of its batch
    statistics over `images`, the rest of the net in eval mode.

    A short run leaves the running stats near their init (mean 0, var 1) and the EMA copy lags
    them further; in eval mode every layer then shrinks the signal, and the net maps all images
    to one embedding (cosine 1.0 to six digits). Recomputing the statistics for the weights
    actually evaluated and exported fixes that; it depends only on weights and images, so it is
    deterministic and idempotent.
    """
    import paddle

    norms = [layer for layer in model.sublayers() if isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))]
    model.eval()
    momenta = [norm._momentum for norm in norms]
    for norm in norms:
        norm.train()
    try:
        with paddle.no_grad():
            for step, (batch, _) in enumerate(images.batches(), start=1):
                for norm in norms:
                    norm._momentum = 1.0 - 1.0 / step  # running = mean of the batch stats so far
                model(paddle.to_tensor(batch))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm._momentum = momentum
        model.eval()


def make_evaluate(data: RecData, settings: RecSettings, calibration: Embedder) -> Callable[[Any], dict[str, float]] | None:
    from shitu_cli.train.metrics import GALLERY, QUERY, RetrievalBatch, RetrievalEvaluator

    if not data.query:
        return None
    embed_gallery, embed_query = Embedder(data.gallery, settings), Embedder(data.query, settings)
    evaluator = RetrievalEvaluator(ks=(1, 5))

    def evaluate(model) -> dict[str, float]:
        # Mutates the evaluated model's BN statistics on purpose: the best checkpoint saved
        # right after this evaluation then holds exactly the statistics that were measured.
        calibrate_batch_norm(model, calibration)
        evaluator.reset()
        for side, embed in ((GALLERY, embed_gallery), (QUERY, embed_query)):
            features, labels = embed(model)
            evaluator.process(features, RetrievalBatch(labels, side))
        metrics = evaluator.evaluate()
        return {name: round(metrics[name], 6) for name in ("recall1", "recall5", "mAP")}

    return evaluate
