"""List and label files: what the writers produce, the readers read back, and bad lines name file and line."""

from __future__ import annotations

import pytest

from shitu_cli.data.lists import (
    image_list_text,
    labels_text,
    pair_list_text,
    read_image_list,
    read_labels,
    read_pair_list,
    read_rec_list,
    rec_list_text,
)
from shitu_cli.errors import BadInput


def write(tmp_path, text, name="list.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_each_format_round_trips(tmp_path):
    images = [("a/1.jpg", 0), ("b c/2.jpg", 1)]
    pairs = [("JPEGImages/1.jpg", "Annotations/1.xml")]
    rec = [("red apple/1.jpg", "red apple"), ("梨/2.jpg", "梨")]

    assert read_image_list(write(tmp_path, image_list_text(images))) == images
    assert read_pair_list(write(tmp_path, pair_list_text(pairs))) == pairs
    assert read_rec_list(write(tmp_path, rec_list_text(rec))) == rec
    assert read_labels(write(tmp_path, labels_text(["red apple", "梨"]))) == ["red apple", "梨"]


def test_readers_accept_windows_lists(tmp_path):
    # PaddleX 2 on Windows: backslash paths, CRLF endings, sometimes a BOM from the editor.
    path = write(tmp_path, "\ufeffa\\1.jpg 3\r\nb\\2.jpg 4\r\n")

    assert read_image_list(path) == [("a/1.jpg", 3), ("b/2.jpg", 4)]


def test_rec_reader_takes_paddleclas_space_lists_too(tmp_path):
    assert read_rec_list(write(tmp_path, "gallery/x.jpg 12\n")) == [("gallery/x.jpg", "12")]


def test_bad_line_names_file_and_line(tmp_path):
    path = write(tmp_path, "a/1.jpg 0\na/2.jpg zero\n")

    with pytest.raises(BadInput, match="line 2") as caught:
        read_image_list(path)

    assert str(path) in caught.value.one_line()


def test_blank_label_line_is_refused_but_a_trailing_newline_is_fine(tmp_path):
    assert read_labels(write(tmp_path, "cat\ndog\n\n")) == ["cat", "dog"]
    with pytest.raises(BadInput, match="line 2 is blank"):
        read_labels(write(tmp_path, "cat\n\ndog\n"))


def test_missing_list_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        read_rec_list(tmp_path / "nope.txt")


def test_labelled_list_reads_both_dialects_and_names_ids_through_labels_txt(tmp_path):
    from shitu_cli.data.lists import read_labelled_list

    (tmp_path / "labels.txt").write_text("cola\ncoffee cup\n", encoding="utf-8")
    space = write(tmp_path, "cola/1.jpg 0\n", name="space.txt")
    tabbed = write(tmp_path, "coffee cup/2.jpg\tcoffee cup\n", name="tab.txt")

    [by_id] = read_labelled_list(space)
    [by_name] = read_labelled_list(tabbed)

    assert (by_id.path, by_id.label, by_id.label_id) == (tmp_path / "cola/1.jpg", "cola", 0)
    assert (by_name.path, by_name.label, by_name.label_id) == (tmp_path / "coffee cup/2.jpg", "coffee cup", None)


def test_labelled_list_refuses_an_id_that_labels_txt_does_not_name(tmp_path):
    from shitu_cli.data.lists import read_labelled_list

    (tmp_path / "labels.txt").write_text("cola\n", encoding="utf-8")
    with pytest.raises(BadInput, match="class id 3"):
        read_labelled_list(write(tmp_path, "cola/1.jpg 3\n"))


def test_a_tab_list_of_class_ids_without_its_recipe_is_still_read_as_ids(tmp_path):
    from shitu_cli.data.lists import read_labelled_list

    (tmp_path / "labels.txt").write_text("coffee cup\ncola\n", encoding="utf-8")
    [entry] = read_labelled_list(write(tmp_path, "coffee cup/1.jpg\t0\n"))

    assert (entry.label, entry.label_id) == ("coffee cup", 0)
    (tmp_path / "labels.txt").write_text("0\n7\n", encoding="utf-8")  # classes named by numbers stay names
    [named] = read_labelled_list(write(tmp_path, "7/1.jpg\t7\n"))
    assert (named.label, named.label_id) == ("7", None)
