"""PaddleClas's deploy/python scripts, copied from the paddleclas wheel into a temp folder and patched to run on
Paddle 3.3.1, configured for shitu's det + rec models (benchmarks/vs_paddleclas.py uses this)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PYTHON = sys.executable

# (file, text, replacement, why): the four patches STACK.md lists, as far as these models need them.
PATCHES = [
    ("utils/predictor.py", "        config.enable_memory_optim()\n", "",
     "drop `config.enable_memory_optim()`: it raises on Paddle 3 `.json` programs"),
    ("utils/predictor.py", "                config.enable_mkldnn()\n",
     "                config.enable_mkldnn()\n"
     "                if inference_model_dir == args.get(\"det_inference_model_dir\"):\n"
     "                    config.delete_pass(\"onednn_placement_pass\")\n",
     "`delete_pass(\"onednn_placement_pass\")` for the PIR PicoDet with oneDNN (Paddle 3.3 crashes on its upsample op)"),
    ("python/predict_system.py", '            xmin, ymin, xmax, ymax = result["bbox"].astype("int")\n',
     '            xmin, ymin, xmax, ymax = result["bbox"].astype("int")\n'
     "            xmin, ymin = max(int(xmin), 0), max(int(ymin), 0)\n",
     "clip negative box corners before cropping (an empty slice crashes the resize)"),
]
NOT_NEEDED = ("`Config(pdmodel, pdiparams)` for legacy model dirs: not needed, both models are Paddle 3 `.json` "
              "programs, which PaddleClas opens as `inference.json` (the detector's `model.json` is copied to that name)")

# predict_system.py's main() minus draw_bbox_results (shitu predict draws nothing by default either).
PREDICT_DRIVER = '''
from paddleclas.deploy.python.predict_system import SystemPredictor
from paddleclas.deploy.utils import config
from paddleclas.deploy.utils.get_image_list import get_image_list
import cv2

args = config.parse_args()
cfg = config.get_config(args.config, overrides=args.override, show=False)
predictor = SystemPredictor(cfg)
for image_file in get_image_list(cfg["Global"]["infer_imgs"]):
    print(predictor.predict(cv2.imread(image_file)[:, :, ::-1]))
'''


@dataclass
class PaddleClasSetup:
    root: Path  # holds the patched paddleclas/deploy
    run_dir: Path
    det_dir_ours: Path
    det_dir_theirs: Path
    rec_dir: Path
    config_path: Path
    index_dir: Path
    patches: list[str] = field(default_factory=list)

    def env(self) -> dict:
        import os

        return {**os.environ, "PYTHONPATH": str(self.root)}

    def predict_command(self, folder: Path, threads: int) -> list[str]:
        return [PYTHON, str(self.run_dir / "predict_system_nodraw.py"), "-c", str(self.config_path),
                "-o", f"Global.infer_imgs={folder}", "-o", f"Global.cpu_num_threads={threads}"]

    def build_command(self, index_dir: Path, threads: int) -> list[str]:
        return [PYTHON, str(self.root / "paddleclas" / "deploy" / "python" / "build_gallery.py"), "-c", str(self.config_path),
                "-o", f"IndexProcess.index_dir={index_dir}", "-o", f"Global.cpu_num_threads={threads}",
                "-o", f"IndexProcess.image_root={self.run_dir / 'gallery'}",
                "-o", f"IndexProcess.data_file={self.run_dir / 'gallery' / 'labels.txt'}"]

    def write_gallery_list(self, gallery: Path) -> None:
        """Copy a class-folder gallery under run_dir/gallery with labels PaddleClas can read back: its id_map
        splits "path<TAB>label" on any whitespace, so "coffee cup" becomes "coffee_cup"."""
        target = self.run_dir / "gallery"
        shutil.rmtree(target, ignore_errors=True)
        lines = []
        for image in sorted(Path(gallery).rglob("*.jpg")):
            label = image.parent.name.replace(" ", "_")
            relative = Path(label) / image.name
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target / relative)
            lines.append(f"{relative.as_posix()}\t{label}")
        (target / "labels.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    @staticmethod
    def label_back(label: str) -> str:
        return label.replace("_", " ")

    def system_predictor(self, threads: int):
        """PaddleClas's SystemPredictor in this process (the patched copy comes first on sys.path)."""
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        from paddleclas.deploy.python.predict_system import SystemPredictor
        from paddleclas.deploy.utils import config

        assert str(self.root) in sys.modules["paddleclas"].__file__, "the venv's paddleclas was imported first"
        cfg = config.get_config(str(self.config_path), overrides=[f"Global.cpu_num_threads={threads}"], show=False)
        return SystemPredictor(cfg)


def prepare_paddleclas(work: Path, det_dir: Path, rec_dir: Path, gallery: Path) -> PaddleClasSetup:
    import importlib.util

    # find_spec locates the wheel without importing it: the patched copy must be the one imported later
    wheel = Path(importlib.util.find_spec("paddleclas").origin).parent
    root, run_dir = work / "paddleclas_patched", work / "paddleclas_run"
    shutil.copytree(wheel / "deploy", root / "paddleclas" / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "paddleclas" / "__init__.py").write_text("", encoding="utf-8")
    applied = []
    for relative, text, replacement, why in PATCHES:
        path = root / "paddleclas" / "deploy" / relative
        source = path.read_text(encoding="utf-8")
        if text not in source:
            raise RuntimeError(f"patch does not apply to {relative}: {why}")
        path.write_text(source.replace(text, replacement, 1), encoding="utf-8")
        applied.append(f"`deploy/{relative}`: {why}")
    applied.append(NOT_NEEDED)
    det_theirs = work / "det_for_paddleclas"
    det_theirs.mkdir(parents=True)
    shutil.copy(Path(det_dir) / "model.json", det_theirs / "inference.json")
    shutil.copy(Path(det_dir) / "model.pdiparams", det_theirs / "inference.pdiparams")
    run_dir.mkdir(parents=True)
    (run_dir / "predict_system_nodraw.py").write_text(PREDICT_DRIVER, encoding="utf-8")
    setup = PaddleClasSetup(root, run_dir, Path(det_dir), det_theirs, Path(rec_dir), run_dir / "config.yaml",
                            work / "paddleclas_index", applied)
    setup.config_path.write_text(yaml.safe_dump(_config(setup, Path(det_dir), Path(rec_dir))), encoding="utf-8")
    setup.write_gallery_list(gallery)
    done = subprocess.run(setup.build_command(setup.index_dir, 1), cwd=run_dir, env=setup.env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"PaddleClas build_gallery.py failed:\n{done.stderr[-3000:]}")
    return setup


def _config(setup: PaddleClasSetup, det_dir: Path, rec_dir: Path) -> dict:
    """inference_general.yaml's settings, with shitu's models, their input sizes and normalisation."""
    from shitu_cli.artifacts import read_yaml
    from shitu_cli.models.manifest import read_model_manifest

    det_steps = {step["type"]: step for step in read_yaml(det_dir / "infer_cfg.yml")["Preprocess"]}
    det_size = [int(v) for v in det_steps["Resize"]["target_size"]]
    rec = read_model_manifest(rec_dir, task="rec")
    return {
        "Global": {
            "infer_imgs": "", "det_inference_model_dir": str(setup.det_dir_theirs), "rec_inference_model_dir": str(rec_dir),
            "rec_nms_thresold": 0.05, "batch_size": 1, "image_shape": [3, *det_size], "threshold": 0.2,
            "max_det_results": 5, "label_list": ["foreground"], "use_gpu": False, "enable_mkldnn": True,
            "cpu_num_threads": 1, "enable_benchmark": False, "use_fp16": False, "ir_optim": True, "use_tensorrt": False,
            "gpu_mem": 8000, "enable_profile": False,
        },
        "DetPreProcess": {"transform_ops": [
            {"DetResize": {"interp": int(det_steps["Resize"].get("interp", 2)), "keep_ratio": False, "target_size": det_size}},
            {"DetNormalizeImage": {"is_scale": True, "mean": list(det_steps["NormalizeImage"]["mean"]),
                                   "std": list(det_steps["NormalizeImage"]["std"])}},
            {"DetPermute": {}},
        ]},
        "DetPostProcess": {},
        "RecPreProcess": {"transform_ops": [
            {"ResizeImage": {"size": [int(rec.input_size[1]), int(rec.input_size[0])], "return_numpy": False,
                             "interpolation": "bilinear", "backend": "cv2"}},
            {"NormalizeImage": {"scale": "1.0/255.0", "mean": list(rec.preprocess.mean), "std": list(rec.preprocess.std),
                                "order": "hwc"}},
            {"ToCHWImage": None},
        ]},
        "RecPostProcess": None,
        "IndexProcess": {
            "index_method": "Flat", "image_root": str(setup.run_dir / "gallery"), "index_dir": str(setup.index_dir),
            "data_file": str(setup.run_dir / "gallery" / "labels.txt"), "index_operation": "new", "delimiter": "\t",
            "dist_type": "IP", "embedding_size": int(rec.embedding_dim), "batch_size": 32, "return_k": 5, "score_thres": 0.5,
        },
    }
