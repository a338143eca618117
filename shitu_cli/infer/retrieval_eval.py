"""`shitu eval`: retrieval quality of a rec model, as PaddleClas's eval measures it: recall@k and mAP of
labelled queries against a gallery folder or list, against a built index, or leave-one-out in one folder.

Scores are pure nearest-neighbour retrieval (no --rec-thresh, no "unknown"); the metric definitions are
`shitu_cli.train.metrics.retrieval_metrics`, the ones training reports. A query never retrieves its own
file: that is what leave-one-out means, and it also keeps a query that sits in the gallery honest.
Against an index, the ranking is exact over the vectors it stores (not an IVF/HNSW approximate
search), so the figures measure the model, not the index type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shitu_cli.errors import BadInput, WorkFailed

CORE = "shitu_cli.infer.retrieval_eval:evaluate_retrieval"
REPORT_FILE = "eval.json"
MODES = ("gallery", "index", "leave-one-out")


@dataclass
class Skipped:
    path: str
    reason: str
    side: str  # "query" or "gallery"


@dataclass
class QueryRetrieval:
    path: str
    label: str
    nearest_label: str | None  # the nearest gallery item's label (None: no other item to retrieve)
    nearest_path: str | None
    score: float | None  # cosine similarity to that item
    answerable: bool  # the gallery holds another item of this label
    outcome: str | None = None  # with rec_thresh: correct / wrong label / unknown / rejected / false accept


@dataclass
class ClassRecall:
    label: str
    queries: int
    recall1: float


@dataclass
class RetrievalEvalReport:
    mode: str  # one of MODES
    model_dir: str
    queries: int  # queries scored (readable and answerable)
    gallery: int  # gallery items searched
    classes: int  # distinct query labels scored
    metrics: dict[str, float]  # recall1, recall5, ..., mAP: fractions 0..1
    unanswerable: int  # readable queries whose label has no (other) gallery item
    skipped: list[Skipped]
    rec_thresh: float | None = None
    thresholded: dict[str, int] | None = None  # outcome -> count at rec_thresh
    per_class: list[ClassRecall] = field(default_factory=list)
    per_query: list[QueryRetrieval] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    recipe: Path | None = None


@dataclass
class _Side:
    """Embedded, labelled images: one row per vector."""

    paths: list[str]
    labels: list[str]
    vectors: np.ndarray


# ----------------------------------------------------------------------------- scoring (pure)


def own_file_positions(query_paths: Sequence[str], gallery_paths: Sequence[str]) -> list[np.ndarray]:
    """For each query, the gallery rows that hold its own file: those it must not retrieve."""
    rows: dict[str, list[int]] = {}
    for position, path in enumerate(gallery_paths):
        rows.setdefault(path, []).append(position)
    return [np.asarray(rows.get(path, []), dtype=np.int64) for path in query_paths]


def score_retrieval(query: np.ndarray, query_labels: Sequence[str], gallery: np.ndarray, gallery_labels: Sequence[str],
                    excluded: Sequence[np.ndarray] | None = None, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """recall@k and mAP (train.metrics.retrieval_metrics) with each query's `excluded` gallery rows left out.

    Queries that exclude nothing are scored in one call; each of the others against its own
    gallery copy. Results combine as means over answerable queries, exactly as one call would.
    """
    from shitu_cli.train.metrics import retrieval_metrics

    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    excluded = excluded if excluded is not None else [np.zeros(0, np.int64)] * len(query)
    plain = [i for i, rows in enumerate(excluded) if len(rows) == 0]
    parts = []  # (metrics, answerable count)
    if plain:
        metrics = retrieval_metrics(query[plain], query_labels[plain], gallery, gallery_labels, ks)
        parts.append((metrics, len(plain) - int(metrics["unanswerable"])))
    for i, rows in enumerate(excluded):
        if len(rows):
            keep = np.delete(np.arange(len(gallery)), rows)
            metrics = retrieval_metrics(query[i : i + 1], query_labels[i : i + 1], gallery[keep], gallery_labels[keep], ks)
            parts.append((metrics, 1 - int(metrics["unanswerable"])))
    answered = sum(count for _, count in parts)
    names = [f"recall{k}" for k in ks] + ["mAP"]
    combined = {name: (sum(m[name] * count for m, count in parts) / answered if answered else 0.0) for name in names}
    combined["unanswerable"] = float(len(query) - answered)
    return combined


def nearest_items(query: np.ndarray, gallery: np.ndarray, excluded: Sequence[np.ndarray], chunk: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(gallery row, cosine) of each query's nearest neighbour, its own file left out; row -1 when none is left."""
    from shitu_cli.train.metrics import l2_normalize

    query, gallery = l2_normalize(query), l2_normalize(gallery)
    rows, scores = np.full(len(query), -1, np.int64), np.zeros(len(query), np.float32)
    for start in range(0, len(query), chunk):
        similarity = query[start : start + chunk] @ gallery.T
        for offset, own in enumerate(excluded[start : start + chunk]):
            similarity[offset, own] = -np.inf
        if similarity.shape[1]:
            best = np.argmax(similarity, axis=1)
            found = np.isfinite(similarity[np.arange(len(best)), best])
            rows[start : start + len(best)] = np.where(found, best, -1)
            scores[start : start + len(best)] = np.where(found, similarity[np.arange(len(best)), best], 0.0)
    return rows, scores


def per_class_recall(per_query: Sequence[QueryRetrieval]) -> list[ClassRecall]:
    """recall@1 of each label's answerable queries, worst first."""
    tallies: dict[str, list[int]] = {}
    for q in per_query:
        if q.answerable:
            tallies.setdefault(q.label, []).append(int(q.nearest_label == q.label))
    classes = [ClassRecall(label, len(hits), sum(hits) / len(hits)) for label, hits in tallies.items()]
    return sorted(classes, key=lambda c: (c.recall1, c.label))


# ----------------------------------------------------------------------------- reading and embedding


def read_labelled(source: Path, side: str) -> tuple[list[tuple[Path, str]], list[Skipped]]:
    """(path, label) pairs from a folder of label folders or a `path<TAB>label` list; missing files are skipped."""
    from shitu_cli.index.items import read_gallery

    source = Path(source)
    if source.is_file():
        from shitu_cli.infer.evaluate import read_eval_list

        pairs, skipped = [], []
        for path, label in read_eval_list(source):
            if Path(path).is_file():
                pairs.append((Path(path).resolve(), label))
            else:
                skipped.append(Skipped(Path(path).as_posix(), f"listed in {source.name} but not found", side))
        return pairs, skipped
    if not source.exists():
        raise BadInput(f"{side} not found", hint="pass a folder with one subfolder per label, or a path<TAB>label list", path=source)
    pairs, problems = read_gallery(source)
    return pairs, [Skipped(p.path, p.reason, side) for p in problems]


def _embed(embedder, pairs: list[tuple[Path, str]], side: str, main_object, progress) -> tuple[_Side, list[Skipped]]:
    paths = [p for p, _ in pairs]
    positions, vectors, failures, _ = embedder.embed_files(paths, progress, main_object=main_object)
    embedded = _Side([paths[i].as_posix() for i in positions], [pairs[i][1] for i in positions], vectors)
    return embedded, [Skipped(f.path, f.reason, side) for f in failures]


def _index_side(index_dir: Path) -> tuple[_Side, Any]:
    """Every vector an index holds, with its item's path and label."""
    from shitu_cli.index import backend
    from shitu_cli.index.store import load_index

    stored = load_index(index_dir)
    ids, vectors = backend.stored(stored.index)
    items = [stored.items[int(i)] for i in ids]
    return _Side([Path(item.path).as_posix() for item in items], [item.label for item in items], vectors), stored


# ----------------------------------------------------------------------------- the command's twin


def evaluate_retrieval(query: Path | str, out: Path | str | None = None, gallery: Path | str | None = None,
                       index: Path | str | None = None, rec: Path | str | None = None, det: Path | str | None = None,
                       det_thresh: float = 0.3, rec_thresh: float | None = None, ks: Sequence[int] = (1, 5),
                       batch_size: int = 32, threads: int = 1, mkldnn: bool = True, backend: str = "auto",
                       progress: Callable[..., None] | None = None) -> RetrievalEvalReport:
    """Embed the labelled queries (and gallery) and score retrieval; with `out`, write eval.json + recipe.yaml."""
    from shitu_cli.infer.embedder import Embedder
    from shitu_cli.infer.predictor import PredictorOptions

    options = _check_arguments(gallery, index, ks, rec_thresh)
    mode = "index" if index is not None else ("gallery" if gallery is not None else "leave-one-out")
    notes: list[str] = []
    stored = None
    if mode == "index":
        gallery_side, stored = _index_side(Path(index))
    model_dir = _model_dir(rec, stored, notes)
    predictor_options = PredictorOptions(backend=backend, threads=threads, mkldnn=mkldnn)
    embedder = Embedder(model_dir, predictor_options, batch_size=batch_size)
    if stored is not None:
        from shitu_cli.infer.pipeline import check_model_fits_index

        notes += [n for n in [check_model_fits_index(stored.manifest.model, embedder.manifest, model_dir)] if n]
    main_object = _main_object(det, det_thresh, predictor_options)
    query_pairs, skipped = read_labelled(Path(query), "query")
    if mode == "gallery":
        gallery_pairs, gallery_skipped = read_labelled(Path(gallery), "gallery")
        skipped += gallery_skipped
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(len(query_pairs) + (len(gallery_pairs) if mode == "gallery" else 0))
    query_side, failed = _embed(embedder, query_pairs, "query", main_object, progress)
    skipped += failed
    if not query_side.paths:
        _refuse_no_queries(query, query_pairs, skipped)
    if mode == "gallery":
        gallery_side, failed = _embed(embedder, gallery_pairs, "gallery", main_object, progress)
        skipped += failed
    elif mode == "leave-one-out":
        gallery_side = query_side
    if not len(gallery_side.paths):
        raise WorkFailed("the gallery holds no readable image, so there is nothing to retrieve", path=gallery or index)
    report = _score(mode, model_dir, query_side, gallery_side, ks, rec_thresh, skipped, notes)
    if out is not None:
        _write(report, Path(out), {"query": query, "gallery": gallery, "index": index, "rec": model_dir, "det": det,
                                   "det_thresh": det_thresh, **options,
                                   "batch_size": batch_size, "threads": threads, "mkldnn": mkldnn, "backend": backend})
    return report


def _check_arguments(gallery, index, ks: Sequence[int], rec_thresh: float | None) -> dict[str, Any]:
    if gallery is not None and index is not None:
        raise BadInput("pass --gallery or --index, not both", hint="--index searches a built index; --gallery embeds a folder or list")
    if not ks or any(int(k) < 1 for k in ks):
        raise BadInput(f"recall ranks must be positive, got {list(ks)}")
    if rec_thresh is not None and not -1.0 <= rec_thresh <= 1.0:
        raise BadInput(f"--rec-thresh is a cosine similarity in [-1, 1], got {rec_thresh}")
    return {"ks": [int(k) for k in ks], "rec_thresh": rec_thresh}


def _model_dir(rec, stored, notes: list[str]) -> Path:
    from shitu_cli.models.registry import default_rec_model, resolve_model_dir

    if rec is not None:
        return resolve_model_dir(rec)
    if stored is not None:
        return Path(stored.manifest.model.dir)
    model_dir, which = default_rec_model()
    notes.append(f"no --rec given: evaluating {which}")
    return model_dir


def _main_object(det, det_thresh: float, options):
    if det is None:
        return None
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import main_object_crop
    from shitu_cli.models.registry import resolve_model_dir

    return main_object_crop(Detector(resolve_model_dir(det), options), det_thresh)


def _refuse_no_queries(query, pairs, skipped: list[Skipped]) -> None:
    unread = [s for s in skipped if s.side == "query"]
    if not pairs and not unread:
        raise BadInput("no query images", hint="put images in one subfolder per label, or list `path<TAB>label` lines", path=query)
    first = unread[0]
    raise WorkFailed(f"none of the {len(unread)} query image(s) could be read (first: {first.path}: {first.reason})", path=query)


def _score(mode: str, model_dir: Path, query: _Side, gallery: _Side, ks, rec_thresh, skipped, notes) -> RetrievalEvalReport:
    from collections import Counter

    from shitu_cli.infer.evaluate import classify_outcome

    excluded = own_file_positions(query.paths, gallery.paths)
    if mode != "leave-one-out" and any(len(rows) for rows in excluded):
        count = sum(1 for rows in excluded if len(rows))
        notes.append(f"{count} query image(s) are also in the gallery; each is scored without its own copy (leave-one-out)")
    metrics = score_retrieval(query.vectors, query.labels, gallery.vectors, gallery.labels, excluded, ks)
    rows, scores = nearest_items(query.vectors, gallery.vectors, excluded)
    known = set(gallery.labels)
    per_label = Counter(gallery.labels)
    per_query = []
    for i, (row, score) in enumerate(zip(rows.tolist(), scores.tolist())):
        own = sum(1 for j in excluded[i].tolist() if gallery.labels[j] == query.labels[i])
        answerable = per_label[query.labels[i]] > own
        nearest = gallery.labels[row] if row >= 0 else None
        outcome = None
        if rec_thresh is not None:
            said = nearest if (row >= 0 and score >= rec_thresh) else None
            outcome = classify_outcome(query.labels[i], said, known if answerable else known - {query.labels[i]})
        per_query.append(QueryRetrieval(query.paths[i], query.labels[i], nearest, gallery.paths[row] if row >= 0 else None,
                                        round(float(score), 6) if row >= 0 else None, answerable, outcome))
    thresholded = None
    if rec_thresh is not None:
        thresholded = {}
        for q in per_query:
            thresholded[q.outcome] = thresholded.get(q.outcome, 0) + 1
    scored = [q for q in per_query if q.answerable]
    unanswerable = int(metrics.pop("unanswerable"))
    if unanswerable:
        notes.append(f"{unanswerable} query image(s) have no other gallery item of their label; they are not scored")
    return RetrievalEvalReport(
        mode=mode, model_dir=model_dir.resolve().as_posix(), queries=len(scored), gallery=len(gallery.paths),
        classes=len({q.label for q in scored}), metrics={k: round(v, 6) for k, v in metrics.items()},
        unanswerable=unanswerable, skipped=skipped, rec_thresh=rec_thresh, thresholded=thresholded,
        per_class=per_class_recall(per_query), per_query=per_query, notes=notes,
    )


def _write(report: RetrievalEvalReport, out: Path, options: dict[str, Any]) -> None:
    import json

    from shitu_cli.artifacts import atomic_write_text
    from shitu_cli.recipes import Recipe, write_recipe

    if out.exists() and not out.is_dir():
        raise BadInput("--out is a file, not a folder", path=out)
    document = {k: v for k, v in asdict(report).items() if k not in ("out_dir", "recipe")}
    path = out / REPORT_FILE
    try:
        atomic_write_text(path, json.dumps(_plain(document), ensure_ascii=False, indent=1) + "\n")
    except OSError as exc:
        raise BadInput(f"cannot write the report ({exc.strerror or exc.__class__.__name__})", path=path) from None
    options = {k: (Path(v).resolve().as_posix() if isinstance(v, Path) else v) for k, v in options.items()}
    for key in ("query", "gallery", "index", "det"):
        if options.get(key) is not None:
            options[key] = Path(options[key]).resolve().as_posix()
    metrics = {**report.metrics, "queries": report.queries, "gallery": report.gallery}
    report.recipe = write_recipe(out, Recipe(command="eval", core=CORE, options=options, metrics=metrics), [path])
    report.out_dir = out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value
