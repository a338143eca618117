"""`shitu serve` end to end: the real server in a subprocess on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import io
import json
import signal
import socket

import pytest

from serve_helpers import ROOT, demo_index, start_server

QUERIES = ROOT / "assets" / "demo" / "queries" / "images"
DET = ROOT / "assets" / "demo" / "models" / "det"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    gallery, index = demo_index(root)
    env = {"SHITU_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache"), "SHITU_TOKEN": TOKEN}
    server = start_server(["--index", index, "--det", DET, "--max-upload-mb", "0.25", "--max-megapixels", "0.5",
                           "--url-timeout", "1"], root / "serve.log", env)
    yield server, gallery, index
    server.stop()


def flat_jpeg(width: int, height: int) -> bytes:
    """Many pixels in few bytes: one colour compresses to almost nothing."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(out, "JPEG", quality=80)
    return out.getvalue()


def test_it_says_its_url_and_answers_health_version_and_the_page(served):
    server, _, _ = served
    assert "shitu serve: http://127.0.0.1:" in server.stderr()
    health = server.get("/health")
    assert health.status == 200 and health.body["status"] == "ok" and health.body["count"] == 18
    version = server.get("/version").body
    assert version["shitu"] == __import__("shitu_cli").__version__ and "paddlepaddle" in version
    page = server.request("GET", "/")
    assert page.status == 200 and "<canvas" in page.body["_text"]


def test_an_upload_gets_the_same_json_as_predict(served, cli):
    server, _, index = served
    query = QUERIES / "scene_000.jpg"
    answer = server.post_files("/recognise", [(query.name, query.read_bytes())])
    assert answer.status == 200, answer.body
    predicted = cli("predict", query, "--index", index, "--det", DET, "--json")
    assert predicted.exit_code == 0, predicted.stderr
    expected = json.loads(predicted.stdout)
    assert set(answer.body) == set(expected)
    (served_image,), (cli_image,) = answer.body["images"], expected["images"]
    assert served_image["path"] == "scene_000.jpg" and cli_image["path"].endswith("scene_000.jpg")
    assert served_image["size"] == cli_image["size"]
    # same recognitions; numbers to float noise (the two processes may each pick their fastest backend)
    assert len(served_image["recognitions"]) == len(cli_image["recognitions"])
    for served_rec, cli_rec in zip(served_image["recognitions"], cli_image["recognitions"]):
        assert set(served_rec) == set(cli_rec) and served_rec["label"] == cli_rec["label"]
        assert served_rec["box"] == pytest.approx(cli_rec["box"], abs=1e-2)
        assert served_rec["score"] == pytest.approx(cli_rec["score"], abs=1e-3)
        assert [(m["label"], m["gallery_path"]) for m in served_rec["matches"]] == \
               [(m["label"], m["gallery_path"]) for m in cli_rec["matches"]]
    assert served_image["recognitions"][0]["label"] == "horse"
    assert answer.headers["x-shitu-generation"].isdigit()


def test_a_url_is_fetched_and_a_bad_one_is_a_4xx_naming_it(served):
    from model_server import ModelServer

    server, _, _ = served
    query = (QUERIES / "scene_002.jpg").read_bytes()
    files = ModelServer(files={"/shot.jpg": query, "/notes.txt": b"hello"}).start()
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)  # accepts, never answers
    try:
        good = server.post_json("/recognise", {"url": f"{files.base_url}/shot.jpg"})
        assert good.status == 200 and good.body["images"][0]["path"] == f"{files.base_url}/shot.jpg"
        assert good.body["images"][0]["recognitions"][0]["label"] == "rocket"
        missing = server.post_json("/recognise", {"url": f"{files.base_url}/gone.jpg"})
        assert missing.status == 400 and "HTTP 404" in missing.body["error"] and f"{files.base_url}/gone.jpg" in missing.body["error"]
        not_image = server.post_json("/recognise", {"url": f"{files.base_url}/notes.txt"})
        assert not_image.status == 422 and "not an image" in not_image.body["error"]
        slow = server.post_json("/recognise", {"url": f"http://127.0.0.1:{stalled.getsockname()[1]}/x.jpg"})
        assert slow.status == 400 and "did not answer within 1 s" in slow.body["error"]
        ftp = server.post_json("/recognise", {"url": "ftp://example.org/x.jpg"})
        assert ftp.status == 400 and "http" in ftp.body["error"]
    finally:
        files.stop()
        stalled.close()


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "empty", "too_many_bytes", "too_many_pixels",
                                  "no_file_part", "two_files", "json_without_url", "not_json", "plain_text_body"])
def test_a_bad_upload_is_a_4xx_json_error_naming_the_problem(served, case):
    server, _, _ = served
    good = (QUERIES / "scene_001.jpg").read_bytes()
    sends = {
        "not_an_image": lambda: server.post_files("/recognise", [("notes.jpg", b"these are words, not pixels")]),
        "truncated": lambda: server.post_files("/recognise", [("cut.jpg", good[: len(good) // 2])]),
        "empty": lambda: server.post_files("/recognise", [("empty.png", b"")]),
        "too_many_bytes": lambda: server.post_files("/recognise", [("big.jpg", good + b"\0" * 300_000)]),
        "too_many_pixels": lambda: server.post_files("/recognise", [("wide.jpg", flat_jpeg(1000, 600))]),
        "no_file_part": lambda: server.post_files("/recognise", [], {"label": "x"}),
        "two_files": lambda: server.post_files("/recognise", [("a.jpg", good), ("b.jpg", good)]),
        "json_without_url": lambda: server.post_json("/recognise", {"link": "http://x"}),
        "not_json": lambda: server.request("POST", "/recognise", b"{nope", "application/json"),
        "plain_text_body": lambda: server.request("POST", "/recognise", b"hello", "text/plain"),
    }
    expected = {"not_an_image": (422, "notes.jpg: not an image"), "truncated": (422, "cut.jpg: corrupt or truncated"),
                "empty": (422, "empty.png: empty file"), "too_many_bytes": (413, "byte limit"),
                "too_many_pixels": (413, "wide.jpg: image is 1000x600, over the 500,000 pixel limit"),
                "no_file_part": (400, "exactly one `file` part, got 0"), "two_files": (400, "got 2"),
                "json_without_url": (400, "no `url`"), "not_json": (400, "not valid JSON"),
                "plain_text_body": (415, "multipart/form-data")}
    answer = sends[case]()
    status, words = expected[case]
    assert answer.status == status, answer.body
    assert words in answer.body["error"] and answer.body["status"] == status
    assert "Traceback" not in json.dumps(answer.body)


def test_edits_need_the_token_and_reading_does_not(served):
    server, _, _ = served
    photo = (QUERIES / "scene_003.jpg").read_bytes()
    for token in (None, "wrong"):
        for answer in (server.post_files("/gallery/add", [("x.jpg", photo)], {"label": "thing"}, token=token),
                       server.post_json("/gallery/remove", {"label": "cat"}, token=token),
                       server.request("POST", "/gallery/sync", token=token)):
            assert answer.status == 401 and "token" in answer.body["error"]
    assert server.get("/gallery").status == 200
    assert server.post_files("/recognise", [("q.jpg", photo)]).status == 200


def test_edits_are_served_live_add_crop_remove_and_sync(served):
    server, gallery, _ = served
    before = server.get("/gallery").body
    query = (QUERIES / "scene_004.jpg").read_bytes()
    first = server.post_files("/recognise", [("q.jpg", query)]).body["images"][0]["recognitions"][0]

    added = server.post_files("/gallery/add", [("shelf photo.jpg", query)], {"label": "new product"}, token=TOKEN)
    assert added.status == 200, added.body
    assert added.body["generation"] > before["generation"] and len(added.body["added"]) == 1
    assert (gallery / "new product" / "shelf photo.jpg").is_file()
    whole = server.post_files("/recognise", [("q.jpg", query)])
    assert int(whole.headers["x-shitu-generation"]) == added.body["generation"]
    assert server.get("/gallery").body["labels"]["new product"] == 1

    box = ",".join(f"{v:.1f}" for v in first["box"])
    crop = server.post_files("/gallery/add", [("q.jpg", query)], {"label": "boxed", "box": box}, token=TOKEN)
    assert crop.status == 200 and crop.body["added"][0]["path"].endswith(".png")
    again = server.post_files("/recognise", [("q.jpg", query)]).body["images"][0]["recognitions"]
    assert again[0]["label"] == "boxed" and again[0]["score"] > 0.99  # the crop finds itself

    removed = server.post_json("/gallery/remove", {"label": "boxed"}, token=TOKEN)
    assert removed.status == 200 and removed.body["removed"] == 1
    assert "boxed" not in server.get("/gallery").body["labels"]
    bad = server.post_json("/gallery/remove", {"label": "boxd"}, token=TOKEN)
    assert bad.status == 400 and "no label 'boxd'" in bad.body["error"]

    (gallery / "synced").mkdir()
    (gallery / "synced" / "s.jpg").write_bytes((QUERIES / "scene_005.jpg").read_bytes())
    synced = server.request("POST", "/gallery/sync", token=TOKEN)
    assert synced.status == 200 and synced.body["added"] == 1
    assert server.get("/gallery").body["labels"]["synced"] == 1


def test_bad_edits_are_4xx(served):
    server, _, _ = served
    photo = (QUERIES / "scene_006.jpg").read_bytes()
    cases = [
        (server.post_files("/gallery/add", [("x.jpg", photo)], {"label": "../up"}, token=TOKEN), 400, "cannot be a folder name"),
        (server.post_files("/gallery/add", [("x.jpg", photo)], {}, token=TOKEN), 400, "no `label`"),
        (server.post_files("/gallery/add", [("x.jpg", b"GIF89a broken")], {"label": "a"}, token=TOKEN), 422, "x.jpg"),
        (server.post_files("/gallery/add", [("x.jpg", photo)], {"label": "a", "box": "1,2,3"}, token=TOKEN), 400, "4 numbers"),
        (server.post_files("/gallery/add", [("x.jpg", photo)], {"label": "a", "box": "900,900,950,950"}, token=TOKEN), 400, "no pixels"),
        (server.post_json("/gallery/remove", {"ids": [999999]}, token=TOKEN), 400, "no item with id 999999"),
        (server.post_json("/gallery/remove", {"label": "cat", "ids": [1]}, token=TOKEN), 400, "exactly one"),
        (server.post_json("/gallery/remove", {"colour": "red"}, token=TOKEN), 400, "unknown field"),
    ]
    for answer, status, words in cases:
        assert answer.status == status and words in answer.body["error"], answer.body
    assert not any(p.name == "a" for p in (served[1]).iterdir())


def test_searches_keep_their_generation_while_an_edit_commits(tmp_path):
    """The core pipeline a search took keeps its generation's items; the next search takes the new one."""
    from shitu_cli import Index, Pipeline
    from shitu_cli.data.images import read_image

    gallery, index_dir = demo_index(tmp_path)
    index = Index(index_dir)
    pipe = Pipeline(index)
    in_flight = pipe.current()
    index.remove("horse")
    horse = read_image(gallery / ".removed" / next((gallery / ".removed").iterdir()).name / "horse" / "0.jpg")
    assert in_flight.recognise(horse)[0].label == "horse"  # the generation it started on
    assert in_flight.index.manifest.generation == 1 and pipe.generation == 2
    assert pipe.recognise(horse)[0].label != "horse"


def test_ctrl_c_stops_it_cleanly(tmp_path):
    _, index = demo_index(tmp_path)
    server = start_server(["--index", index], tmp_path / "serve.log", {"SHITU_HOME": str(tmp_path / "home")})
    assert server.get("/health").status == 200
    assert server.stop(signal.SIGINT) == 0
    log = server.stderr()
    assert "shitu serve: stopped" in log and "Traceback" not in log


def test_a_missing_index_is_refused_before_listening(tmp_path, cli):
    result = cli("serve", "--index", tmp_path / "none", "--port", "0")
    assert result.exit_code == 2 and "index folder not found" in result.stderr


def test_several_worker_processes_serve_each_committed_generation(tmp_path):
    gallery, index = demo_index(tmp_path)
    server = start_server(["--index", index, "--workers", "2", "--token", TOKEN], tmp_path / "serve.log",
                          {"SHITU_HOME": str(tmp_path / "home")})
    try:
        photo = (QUERIES / "scene_008.jpg").read_bytes()
        added = server.post_files("/gallery/add", [("p.jpg", photo)], {"label": "two workers"}, token=TOKEN)
        assert added.status == 200 and added.body["generation"] == 2
        # whichever process answers, it serves the generation the other one committed
        answers = [server.post_files("/recognise", [("p.jpg", photo)]) for _ in range(6)]
        assert {a.headers["x-shitu-generation"] for a in answers} == {"2"}
        assert all(a.body["images"][0]["recognitions"][0]["label"] == "two workers" for a in answers)
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0 and "shitu serve: stopped" in server.stderr() and "Traceback" not in server.stderr()


@pytest.mark.slow  # ~11 s: waits out a request time limit; `make test-slow` runs it
def test_a_request_over_the_time_limit_is_a_504_json_error(tmp_path):
    _, index = demo_index(tmp_path)
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)  # accepts, never answers: the URL fetch outlasts the request limit
    server = start_server(["--index", index, "--timeout", "1", "--url-timeout", "5"], tmp_path / "serve.log",
                          {"SHITU_HOME": str(tmp_path / "home")})
    try:
        answer = server.post_json("/recognise", {"url": f"http://127.0.0.1:{stalled.getsockname()[1]}/x.jpg"})
        assert answer.status == 504 and "took over 1 s" in answer.body["error"]
        assert server.get("/health").status == 200  # the server carries on
    finally:
        assert server.stop() == 0
        stalled.close()
