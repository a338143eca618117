"""Structured L1 filter pruning of PP-LCNet (the cls net, the backbone of a rec net or of a PicoDet), done by hand on
the dygraph model: paddleslim 2.6's pruner cannot trace models on paddle 3.3 (it calls removed
`paddle.base.dygraph.base._to_static_mode_guard_`), and PP-LCNet's channel chain is simple enough.

Every "producer" conv (the stem and each block's pointwise conv) keeps its filters with the largest
L1 norm; the consumers of those channels (the next block's depthwise conv, its SE module and pointwise
input, or the tail's last_conv / fc) are cut to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput


@dataclass
class PruneSummary:
    ratio: float
    params_before: int
    params_after: int
    layers: int  # producer convs pruned


def find_pplcnet(model: Any) -> Any:
    """The PPLCNet inside a cls model (itself) or a RecModel (its backbone); BadInput for other nets."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and type(candidate).__name__ == "PPLCNet":
            return candidate
    found = type(getattr(model, "backbone", model)).__name__
    raise BadInput(f"--prune supports PP-LCNet (v1) nets, this one is {found}",
                   hint="use --quant ptq for this model, or train with a PPLCNet_x* model/backbone")


def count_params(model: Any) -> int:
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


def prune_pplcnet(model: Any, ratio: float) -> PruneSummary:
    """Prune `ratio` of each producer conv's filters (L1, smallest first) in place; returns what changed."""
    net = find_pplcnet(model)
    before = count_params(model)
    blocks, producers = _chain(net)
    for index, producer in enumerate(producers):
        keep = _strongest_filters(producer.conv.weight.numpy(), ratio)
        _cut_outputs(producer, keep)
        if index + 1 < len(producers):
            _cut_block_inputs(blocks[index], keep)
        else:
            _cut_tail_inputs(net, keep)
    return PruneSummary(ratio, before, count_params(model), len(producers))


def prune_lcnet_backbone(detector: Any, ratio: float) -> PruneSummary:
    """The same L1 pruning for a PicoDet's LCNet backbone (ppdet's LCNet has PP-LCNet's layout), except
    that the outputs the neck reads (the last pointwise conv of each feature stage) keep every channel,
    so the neck and head stay as trained."""
    net = getattr(detector, "backbone", None)
    if type(net).__name__ != "LCNet":
        raise BadInput(f"--prune supports detectors with an LCNet backbone, this one has {type(net).__name__}",
                       hint="use --quant ptq for this detector")
    before = count_params(detector)
    blocks, producers = _chain(net)
    read_by_neck = {id(getattr(net, f"blocks{stage + 1}")[-1].pw_conv) for stage in net.feature_maps}
    pruned = 0
    for index, producer in enumerate(producers[:-1]):  # the last one always feeds the neck
        if id(producer) in read_by_neck:
            continue
        keep = _strongest_filters(producer.conv.weight.numpy(), ratio)
        _cut_outputs(producer, keep)
        _cut_block_inputs(blocks[index], keep)
        pruned += 1
    return PruneSummary(ratio, before, count_params(detector), pruned)


def _chain(net: Any) -> tuple[list[Any], list[Any]]:
    """The depthwise-separable blocks in order, and the producer convs: the stem, then each block's pointwise conv."""
    blocks = [block for name in ("blocks2", "blocks3", "blocks4", "blocks5", "blocks6") for block in getattr(net, name)]
    return blocks, [net.conv1] + [block.pw_conv for block in blocks]


CHANNEL_MULTIPLE = 8  # oneDNN's blocked layouts run fastest on channel counts that are multiples of 8


def kept_channels(count: int, ratio: float) -> int:
    keep = int(round(count * (1.0 - ratio) / CHANNEL_MULTIPLE)) * CHANNEL_MULTIPLE
    return min(count, max(CHANNEL_MULTIPLE, keep))


def _strongest_filters(weight: np.ndarray, ratio: float) -> np.ndarray:
    count = weight.shape[0]
    keep = kept_channels(count, ratio)
    norms = np.abs(weight).reshape(count, -1).sum(1)
    return np.sort(np.argsort(-norms, kind="stable")[:keep])


def _replace(layer: Any, name: str, value: np.ndarray) -> None:
    """Swap a parameter for a smaller copy, keeping whether it trains."""
    import paddle

    old = getattr(layer, name)
    new = layer.create_parameter(list(value.shape), dtype="float32",
                                 default_initializer=paddle.nn.initializer.Assign(np.ascontiguousarray(value)))
    new.stop_gradient = old.stop_gradient
    setattr(layer, name, new)


def _cut_bn(bn: Any, keep: np.ndarray) -> None:
    for name in ("weight", "bias", "_mean", "_variance"):
        _replace(bn, name, getattr(bn, name).numpy()[keep])
    bn._num_features = len(keep)


def _cut_outputs(conv_bn: Any, keep: np.ndarray) -> None:
    conv = conv_bn.conv
    _replace(conv, "weight", conv.weight.numpy()[keep])
    conv._out_channels = len(keep)
    _cut_bn(conv_bn.bn, keep)


def _cut_block_inputs(block: Any, keep: np.ndarray) -> None:
    dw = block.dw_conv
    _cut_outputs(dw, keep)  # depthwise: one filter per channel, so its outputs are its inputs
    dw.conv._in_channels = dw.conv._groups = len(keep)
    if block.use_se:
        se = block.se
        _replace(se.conv1, "weight", se.conv1.weight.numpy()[:, keep])
        se.conv1._in_channels = len(keep)
        _replace(se.conv2, "weight", se.conv2.weight.numpy()[keep])
        _replace(se.conv2, "bias", se.conv2.bias.numpy()[keep])
        se.conv2._out_channels = len(keep)
    pw = block.pw_conv.conv
    _replace(pw, "weight", pw.weight.numpy()[:, keep])
    pw._in_channels = len(keep)


def _cut_tail_inputs(net: Any, keep: np.ndarray) -> None:
    if net.use_last_conv:
        _replace(net.last_conv, "weight", net.last_conv.weight.numpy()[:, keep])
        net.last_conv._in_channels = len(keep)
    else:  # flatten feeds fc directly: fc weight is [in, out]
        _replace(net.fc, "weight", net.fc.weight.numpy()[keep])
