"""PaddleX 3's list formats, written by `split-dataset --format paddlex | paddlex-rec`.

- paddlex: PaddleX 3 ClsDataset: label.txt (`id name` a line), train.txt and val.txt (and test.txt
  when --test > 0) of `relpath id` lines.
- paddlex-rec: PaddleX 3 ShiTuRecDataset: train.txt, gallery.txt and query.txt of `relpath id`
  lines, with label.txt naming the ids. These are also PaddleClas's rec lists (`path id`, space).
Paths are relative to the dataset dir, so the lists belong in it (split-dataset's default --out).
A path holding a space is separated by a TAB instead, as in the imagenet lists.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from shitu_cli.data.lists import PADDLEX_LABELS_FILE, TAB, image_list_text, paddlex_labels_text

PADDLEX_FORMATS = ("paddlex", "paddlex-rec")


def paddlex_files(fmt: str, parts: Mapping[str, Sequence[str]], id_of: Mapping[str, int], delimiter: str,
                  labels: Sequence[str]) -> tuple[dict[str, bytes], str]:
    """The files of a PaddleX dataset split, and the dialect of their lines."""
    files = {}
    for part, rels in parts.items():
        if fmt == "paddlex" and part == "test" and not rels:
            continue  # PaddleX's ClsDataset has train and val; test.txt only when asked for
        files[f"{part}.txt"] = image_list_text(((rel, id_of[rel]) for rel in rels), delimiter).encode("utf-8")
    files[PADDLEX_LABELS_FILE] = paddlex_labels_text(labels).encode("utf-8")
    return files, "path<TAB>class_id" if delimiter == TAB else "path class_id"
