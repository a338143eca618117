"""`shitu models pull/add` against a loopback server: resume, sha256 trust-on-first-use, safe unpacking, errors."""

from __future__ import annotations

import json
import tarfile

import pytest
import yaml

from ports import free_port
from shitu_cli.models.registry import BASE_URL_ENV, OFFICIAL_MODELS, cache_root, downloads_dir
from tests.model_server import ModelServer, fake_model_files, tar_bytes, tar_with_member, write_bytes

CLS = OFFICIAL_MODELS["PPLCNet_x0_25"]
URL_PATH = "/" + CLS.url_path


@pytest.fixture
def server(monkeypatch):
    running = ModelServer().start()
    monkeypatch.setenv(BASE_URL_ENV, running.base_url)
    yield running
    running.stop()


def _pulled_params(name="PPLCNet_x0_25"):
    return (cache_root() / name / "inference.pdiparams").read_bytes()


def test_pull_installs_model_with_manifest(cli, server):
    files = fake_model_files()
    server.files[URL_PATH] = tar_bytes(files, top="PPLCNet_x0_25_infer")
    result = cli("models", "pull", "PPLCNet_x0_25", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "downloaded"
    model_dir = cache_root() / "PPLCNet_x0_25"
    assert _pulled_params() == files["inference.pdiparams"]
    manifest = yaml.safe_load((model_dir / "shitu.yaml").read_text(encoding="utf-8"))
    assert manifest["task"] == "cls" and manifest["model_file"] == "inference.pdmodel"
    assert manifest["input_size"] == [224, 224] and manifest["preprocess"]["resize"] == "short"
    assert len(manifest["labels"]) == 1000 and manifest["labels"][0].startswith("tench")
    assert not list(downloads_dir().iterdir())  # the archive is not kept once unpacked

    again = cli("models", "pull", "PPLCNet_x0_25", "--json")
    assert json.loads(again.stdout)["status"] == "already cached"
    assert len(server.log) == 1  # nothing downloaded the second time


def test_pull_resumes_from_part_file(cli, server):
    data = tar_bytes(fake_model_files(params_size=500_000), top="PPLCNet_x0_25_infer")
    server.files[URL_PATH] = data
    already = 200_000
    write_bytes(downloads_dir() / (CLS.file_name + ".part"), data[:already])
    result = cli("models", "pull", "PPLCNet_x0_25", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "resumed"
    [served] = server.log
    assert served.range == f"bytes={already}-" and served.status == 206
    assert served.body_bytes == len(data) - already
    assert _pulled_params() == fake_model_files(params_size=500_000)["inference.pdiparams"]


def test_server_ignoring_range_gets_the_whole_file_again(cli, server):
    data = tar_bytes(fake_model_files(), top="x")
    server.files[URL_PATH], server.honour_range = data, False
    write_bytes(downloads_dir() / (CLS.file_name + ".part"), b"garbage that must not be kept")
    assert cli("models", "pull", "PPLCNet_x0_25").exit_code == 0
    assert server.log[0].body_bytes == len(data)
    assert _pulled_params() == fake_model_files()["inference.pdiparams"]


def test_changed_upstream_file_is_refused_and_kept_aside(cli, server):
    server.files[URL_PATH] = tar_bytes(fake_model_files(seed=1), top="x")
    assert cli("models", "pull", "PPLCNet_x0_25").exit_code == 0
    first = _pulled_params()

    server.files[URL_PATH] = tar_bytes(fake_model_files(seed=2), top="x")
    result = cli("models", "pull", "PPLCNet_x0_25", "--force")
    assert result.exit_code == 2
    assert "sha256" in result.stderr and server.base_url + URL_PATH in result.stderr
    assert "--trust-new" in result.stderr and "Traceback" not in result.stderr
    assert _pulled_params() == first  # the cached model is untouched
    assert [p.name.startswith(CLS.file_name + ".rejected-") for p in downloads_dir().iterdir()] == [True]

    accepted = cli("models", "pull", "PPLCNet_x0_25", "--force", "--trust-new")
    assert accepted.exit_code == 0, accepted.stderr
    assert _pulled_params() == fake_model_files(seed=2)["inference.pdiparams"]


def test_recorded_sum_is_checked_after_the_model_dir_is_deleted(cli, server):
    import shutil

    server.files[URL_PATH] = tar_bytes(fake_model_files(seed=1), top="x")
    assert cli("models", "pull", "PPLCNet_x0_25").exit_code == 0
    shutil.rmtree(cache_root() / "PPLCNet_x0_25")
    server.files[URL_PATH] = tar_bytes(fake_model_files(seed=3), top="x")
    result = cli("models", "pull", "PPLCNet_x0_25")
    assert result.exit_code == 2 and "sha256" in result.stderr
    assert not (cache_root() / "PPLCNet_x0_25").exists()


def test_tampered_cached_files_are_detected(cli, server):
    server.files[URL_PATH] = tar_bytes(fake_model_files(), top="x")
    assert cli("models", "pull", "PPLCNet_x0_25").exit_code == 0
    (cache_root() / "PPLCNet_x0_25" / "inference.pdiparams").write_bytes(b"swapped")
    result = cli("models", "pull", "PPLCNet_x0_25")
    assert result.exit_code == 2 and "changed since" in result.stderr and "--force" in result.stderr


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (_member("../evil"), "outside the archive"),
        (_member("m/../../evil"), "outside the archive"),
        (_member("/tmp/shitu-evil-absolute"), "absolute path"),
        (_member("m/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_member("m/hard", tarfile.LNKTYPE, "/etc/passwd"), "is a link"),
        (_member("m/dev", tarfile.CHRTYPE), "device or special file"),
        (_member("m/fifo", tarfile.FIFOTYPE), "device or special file"),
    ],
)
def test_unsafe_archive_members_are_refused(cli, server, tmp_path, member, why):
    server.files[URL_PATH] = tar_with_member(member, b"payload" if member.isreg() else b"")
    before = set(tmp_path.parent.rglob("evil"))
    result = cli("models", "pull", "PPLCNet_x0_25")
    assert result.exit_code == 2
    assert why in result.stderr and member.name in result.stderr
    assert not (cache_root() / "PPLCNet_x0_25").exists()
    assert not list(cache_root().glob(".PPLCNet_x0_25*"))  # no unpack or staging dir left behind
    assert set(tmp_path.parent.rglob("evil")) == before
    from pathlib import Path

    assert not Path("/tmp/shitu-evil-absolute").exists()


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_name_the_url(cli, server, status):
    server.errors[URL_PATH] = status
    result = cli("models", "pull", "PPLCNet_x0_25")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert server.base_url + URL_PATH in line and f"HTTP {status}" in line
    assert "shitu models add" in line and "--name PPLCNet_x0_25" in line


def test_offline_says_how_to_add_by_hand(cli, monkeypatch):
    port = free_port()  # a loopback port that nothing listens on
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{port}")
    result = cli("models", "pull", "PP-ShiTuV2-rec")
    assert result.exit_code == 2
    assert f"http://127.0.0.1:{port}/" in result.stderr and "general_PPLCNetV2_base_pretrained_v1.0_infer.tar" in result.stderr
    assert "shitu models add" in result.stderr and "--name PP-ShiTuV2-rec" in result.stderr


def test_unknown_name_suggests_the_closest(cli):
    result = cli("models", "pull", "PPLCNet-x1_0")
    assert result.exit_code == 2 and "did you mean 'PPLCNet_x1_0'" in result.stderr


def test_add_tar_guesses_the_name_from_the_official_file_name(cli, tmp_path):
    files = fake_model_files()
    archive = write_bytes(tmp_path / "general_PPLCNetV2_base_pretrained_v1.0_infer.tar", tar_bytes(files, top="general"))
    result = cli("models", "add", archive, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "PP-ShiTuV2-rec"
    manifest = yaml.safe_load((cache_root() / "PP-ShiTuV2-rec" / "shitu.yaml").read_text(encoding="utf-8"))
    assert manifest["task"] == "rec" and manifest["embedding_dim"] == 512 and manifest["preprocess"]["resize"] == "direct"
    assert archive.is_file()  # the user's own file is left where it was


def test_add_detector_reads_infer_cfg_and_new_export_names(cli, tmp_path):
    folder = tmp_path / "det_export"
    write_bytes(folder / "model.json", b"{}")
    write_bytes(folder / "model.pdiparams", b"params")
    infer_cfg = {
        "arch": "PicoDet",
        "Preprocess": [
            {"type": "Resize", "interp": 2, "keep_ratio": False, "target_size": [320, 320]},
            {"type": "NormalizeImage", "is_scale": True, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            {"type": "Permute"},
        ],
        "label_list": ["foreground"],
        "NMS": {"keep_top_k": 100, "name": "MultiClassNMS", "score_threshold": 0.3},
    }
    write_bytes(folder / "infer_cfg.yml", yaml.safe_dump(infer_cfg).encode())
    result = cli("models", "add", folder, "--name", "PP-ShiTuV2-det")
    assert result.exit_code == 0, result.stderr
    model_dir = cache_root() / "PP-ShiTuV2-det"
    manifest = yaml.safe_load((model_dir / "shitu.yaml").read_text(encoding="utf-8"))
    assert manifest["task"] == "det" and manifest["labels"] == ["foreground"]
    assert manifest["model_file"] == "model.json" and manifest["input_size"] == [320, 320]
    assert manifest["preprocess"]["interpolation"] == "cubic" and manifest["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert manifest["input_names"] == ["image", "scale_factor"] and manifest["extra"]["nms"]["keep_top_k"] == 100
    assert (model_dir / "infer_cfg.yml").is_file()


def test_add_refuses_what_it_cannot_describe(cli, tmp_path):
    folder = tmp_path / "mystery"
    for name, data in fake_model_files().items():
        write_bytes(folder / name, data)
    no_name = cli("models", "add", folder)
    assert no_name.exit_code == 2 and "--name" in no_name.stderr
    custom = cli("models", "add", folder, "--name", "my-model")
    assert custom.exit_code == 2 and "shitu.yaml" in custom.stderr
    bad_name = cli("models", "add", folder, "--name", "../escape")
    assert bad_name.exit_code == 2 and "cache folder name" in bad_name.stderr
    empty = cli("models", "add", write_bytes(tmp_path / "PPLCNet_x0_25_infer.tar", tar_bytes({"readme.txt": b"hi"})))
    assert empty.exit_code == 2 and "no Paddle inference models found" in empty.stderr
    not_tar = cli("models", "add", write_bytes(tmp_path / "x.bin", b"\0" * 10), "--name", "PPLCNet_x0_25")
    assert not_tar.exit_code == 2 and "expected a .tar" in not_tar.stderr


def test_weights_pull_is_stored_as_given(cli, server):
    weights = OFFICIAL_MODELS["PPLCNet_x0_25-pretrained"]
    server.files["/" + weights.url_path] = b"pretend pdparams bytes"
    result = cli("models", "pull", weights.name, "--json")
    assert result.exit_code == 0, result.stderr
    path = cache_root() / weights.name / "PPLCNet_x0_25_pretrained.pdparams"
    assert json.loads(result.stdout)["path"] == path.as_posix()
    assert path.read_bytes() == b"pretend pdparams bytes"


def test_hand_added_file_is_checked_against_the_pulled_sum(cli, server, tmp_path):
    server.files[URL_PATH] = tar_bytes(fake_model_files(seed=1), top="x")
    assert cli("models", "pull", "PPLCNet_x0_25").exit_code == 0
    same = write_bytes(tmp_path / "same" / CLS.file_name, server.files[URL_PATH])
    assert cli("models", "add", same).exit_code == 0
    other = write_bytes(tmp_path / "other" / CLS.file_name, tar_bytes(fake_model_files(seed=4), top="x"))
    result = cli("models", "add", other)
    assert result.exit_code == 2 and "sha256" in result.stderr and str(other) in result.stderr
    assert other.is_file()  # the user's own file is neither moved nor deleted
    assert _pulled_params() == fake_model_files(seed=1)["inference.pdiparams"]


def test_folder_added_first_does_not_block_a_later_pull(cli, server, tmp_path):
    folder = tmp_path / "by_hand"
    for name, data in fake_model_files(seed=5).items():
        write_bytes(folder / name, data)
    assert cli("models", "add", folder, "--name", "PPLCNet_x0_25").exit_code == 0
    server.files[URL_PATH] = tar_bytes(fake_model_files(seed=6), top="x")
    result = cli("models", "pull", "PPLCNet_x0_25", "--force")
    assert result.exit_code == 0, result.stderr
    assert _pulled_params() == fake_model_files(seed=6)["inference.pdiparams"]
