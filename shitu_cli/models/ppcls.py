"""Access to PaddleClas architectures from the paddleclas wheel, which ships `ppcls` one level down."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from shitu_cli.errors import BadInput
from shitu_cli.models.cls_families import all_archs

LCNET_ARCHS = (
    "PPLCNet_x0_25", "PPLCNet_x0_35", "PPLCNet_x0_5", "PPLCNet_x0_75", "PPLCNet_x1_0",
    "PPLCNet_x1_5", "PPLCNet_x2_0", "PPLCNet_x2_5",
)
REC_BACKBONES = ("PPLCNetV2_base_ShiTu",) + LCNET_ARCHS
# Every classifier train-cls builds: PP-LCNet, ResNet(-vd), MobileNet, HRNet, ... (see cls_families).
CLS_ARCHS = all_archs()


def import_ppcls() -> Any:
    """Import `ppcls` from inside the paddleclas wheel (it is not a top-level package there)."""
    if "ppcls" not in sys.modules:
        import paddleclas

        root = os.path.dirname(paddleclas.__file__)
        if root not in sys.path:
            sys.path.append(root)
    ppcls = importlib.import_module("ppcls")
    _quiet_ppcls_logger()
    return ppcls


def _quiet_ppcls_logger() -> None:
    """ppcls logs through a module-level logger that only its training engine sets up; ResNet, HRNet and
    others call logger.warning while building (a deprecation note), which fails on the unset logger.
    Give it a silent one: ppcls's own init_logger would print to stdout and spoil --json output."""
    import logging

    from ppcls.utils import logger

    if logger._logger is None:
        quiet = logging.getLogger("shitu.ppcls")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        logger._logger = quiet


def check_arch(name: str, allowed: tuple[str, ...], what: str) -> str:
    if name not in allowed:
        import difflib

        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of: {', '.join(allowed)}"
        raise BadInput(f"unknown {what} {name!r}", hint=hint)
    return name


def build_arch(config: dict[str, Any]) -> Any:
    """Build a ppcls model from an `Arch` config dict (ppcls's own config schema)."""
    import_ppcls()
    from ppcls.arch import build_model

    return build_model({"Arch": config, "Global": {"device": "cpu"}})
