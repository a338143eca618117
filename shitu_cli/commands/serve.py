"""`shitu serve`: an HTTP API and a web page over an index; gallery edits applied live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render


def command(
    index: Path = typer.Option(..., "--index", help="The index folder to serve (from `shitu build-index`)."),
    det: Optional[str] = typer.Option(None, "--det", help="Mainbody detector dir or name: recognise each box."),
    rec: Optional[str] = typer.Option(None, "--rec", help="Rec model dir or name (default: the index's own)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port; the URL said names it)."),
    token: Optional[str] = typer.Option(None, "--token", help="Gallery edits need this token (default: $SHITU_TOKEN). "
                                        "Send it as `Authorization: Bearer TOKEN`."),
    read_token: bool = typer.Option(False, "--token-for-reading", help="Ask the token for recognising too, not only for edits."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Server processes, each with its own models (default: one "
                                          "per usable core, the fastest on 2 cores: benchmarks/serve_load.md)."),
    pool: int = typer.Option(1, "--pool", help="Model copies in each process: how many searches run at once."),
    topk: int = typer.Option(5, "--topk", help="How many distinct labels to report per box."),
    rec_thresh: float = typer.Option(0.5, "--rec-thresh", help="Below this cosine similarity the label is 'unknown'."),
    det_thresh: Optional[float] = typer.Option(None, "--det-thresh", help="With --det: the detector score a box needs."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body (an upload) in MB."),
    max_megapixels: float = typer.Option(40.0, "--max-megapixels", help="Largest image, in millions of pixels."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds a request may take before it gets a 504."),
    url_timeout: float = typer.Option(10.0, "--url-timeout", help="Seconds a client's image URL may take to download."),
    no_urls: bool = typer.Option(False, "--no-urls", help="Refuse to fetch image URLs for clients."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for inference."),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn", help="Use oneDNN (3-5x faster on most CPUs)."),
    backend: str = typer.Option("auto", "--backend", help="paddle, onnxruntime, openvino, or auto."),
) -> None:
    """Serve recognition over HTTP (POST /recognise), a web page at /, and live gallery edits (POST /gallery/...)."""
    from shitu_cli.errors import BadInput, WorkFailed
    from shitu_cli.models.registry import resolve_model_dir

    try:
        from shitu_cli.serve.runner import serve
    except ImportError as exc:  # the server's packages are not needed by the rest of shitu
        raise WorkFailed(f"shitu serve needs the {exc.name} package", hint="pip install fastapi uvicorn python-multipart") from None
    from shitu_cli.serve.service import Limits, ServeSettings

    token = token if token is not None else os.environ.get("SHITU_TOKEN") or None
    if read_token and not token:
        raise BadInput("--token-for-reading needs a token", hint="pass --token or set SHITU_TOKEN")
    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-megapixels", max_megapixels), ("--timeout", timeout), ("--url-timeout", url_timeout)):
        if value <= 0:
            raise BadInput(f"{name} must be positive, got {value:g}")
    options = {"topk": topk, "rec_thresh": rec_thresh} | ({"det_thresh": det_thresh} if det_thresh is not None else {})
    settings = ServeSettings(
        index=str(index), det=str(resolve_model_dir(det)) if det else None, rec=str(resolve_model_dir(rec)) if rec else None,
        backend=backend, threads=threads, mkldnn=mkldnn, pool=pool, token=token, read_token=read_token, allow_urls=not no_urls,
        options=options, limits=Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                       max_pixels=int(max_megapixels * 1_000_000), request_timeout_s=timeout,
                                       url_timeout_s=url_timeout))

    def announce(url: str) -> None:
        render.info(f"shitu serve: {url}  (Ctrl-C stops)")
        render.info(f"index {index}; gallery edits {'need the token' if token else 'are open to anyone who can reach it (no --token)'}")

    serve(settings, host, port, workers if workers is not None else usable_cores(), announce)
    render.info("shitu serve: stopped")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
