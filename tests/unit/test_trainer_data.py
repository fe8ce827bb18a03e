"""Manifest (JSONL, CSV) and COCO readers, with missing and corrupt images skipped and counted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from captionfleet.trainer.data import DataError, Skipped, open_files, open_splits, read_manifest, split_indices

SIZE = (32, 32)


def _images(folder: Path) -> dict[str, Path]:
    """Three good images, one corrupt file, and one name that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, colour in (("red.png", "red"), ("green.jpg", "green"), ("blue.png", "blue")):
        paths[name] = folder / name
        Image.new("RGB", (80, 60), colour).save(paths[name])
    paths["corrupt.jpg"] = folder / "corrupt.jpg"
    paths["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    paths["missing.png"] = folder / "missing.png"
    return paths


def _load(data: Path, image_root: Path | None = None) -> tuple[object, Skipped]:
    skipped = Skipped()
    dataset = open_files(
        str(data), image_root=image_root, size=SIZE, resample=Image.Resampling.BILINEAR, skipped=skipped, threads=2
    )
    return dataset, skipped


def test_jsonl_manifest_with_several_captions_per_image(tmp_path: Path) -> None:
    _images(tmp_path / "img")
    rows = [
        {"image": "img/red.png", "caption": "a red picture"},
        {"image": "img/red.png", "caption": "all red"},
        {"image": "img/green.jpg", "captions": ["green", "a green picture"]},
        {"image": "img/blue.png", "caption": "blue"},
        {"image": "img/corrupt.jpg", "caption": "broken"},
        {"image": "img/missing.png", "caption": "gone"},
    ]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    dataset, skipped = _load(manifest)
    assert len(dataset) == 3  # type: ignore[arg-type]
    assert dataset.captions(0) == ["a red picture", "all red"]  # type: ignore[attr-defined]
    assert dataset.captions(1) == ["green", "a green picture"]  # type: ignore[attr-defined]
    image = dataset.image(0)  # type: ignore[attr-defined]
    assert image.size == SIZE and image.mode == "RGB"  # already at the model's input size
    assert skipped.counts["missing"] == 1
    assert sum(n for k, n in skipped.counts.items() if k.startswith("image_")) == 1  # the corrupt one
    assert skipped.counts["bad_row"] == 1
    assert skipped.total == 3
    assert any("missing.png" in e for e in skipped.examples)


def test_csv_manifest_relative_to_image_root(tmp_path: Path) -> None:
    _images(tmp_path / "pics")
    manifest = tmp_path / "meta" / "data.csv"
    manifest.parent.mkdir()
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for name in ("red.png", "green.jpg", "blue.png", "corrupt.jpg", "missing.png"):
            writer.writerow([name, f"a {name.split('.')[0]} image"])
        writer.writerow(["red.png", ""])  # empty caption: counted, not used
    dataset, skipped = _load(manifest, image_root=tmp_path / "pics")
    assert len(dataset) == 3  # type: ignore[arg-type]
    assert dataset.captions(2) == ["a blue image"]  # type: ignore[attr-defined]
    assert skipped.counts["missing"] == 1 and skipped.counts["empty_caption"] == 1
    assert skipped.total == 3


def test_csv_without_the_right_header_names_the_fix(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,text\na.png,hello\n")
    with pytest.raises(DataError, match="image,caption"):
        read_manifest(manifest)


def test_coco_captions(tmp_path: Path) -> None:
    _images(tmp_path / "train")
    doc = {
        "images": [
            {"id": 1, "file_name": "red.png"},
            {"id": 2, "file_name": "green.jpg"},
            {"id": 3, "file_name": "corrupt.jpg"},
            {"id": 4, "file_name": "missing.png"},
            {"id": 5, "file_name": "blue.png"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A red one."},
            {"id": 11, "image_id": 1, "caption": "Red."},
            {"id": 12, "image_id": 2, "caption": "Green."},
            {"id": 13, "image_id": 3, "caption": "Corrupt."},
            {"id": 14, "image_id": 4, "caption": "Missing."},
            {"id": 15, "image_id": 5, "caption": "Blue."},
            {"id": 16, "image_id": 99, "caption": "No such image."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    dataset, skipped = _load(tmp_path / "captions.json", image_root=tmp_path / "train")
    assert len(dataset) == 3  # type: ignore[arg-type]
    assert dataset.captions(0) == ["A red one.", "Red."]  # type: ignore[attr-defined]
    assert skipped.counts["missing"] == 1 and skipped.counts["bad_row"] == 1
    assert skipped.total == 3


def test_coco_needs_an_image_root(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="--image-root"):
        open_files(
            str(tmp_path / "c.json"),
            image_root=None,
            size=SIZE,
            resample=Image.Resampling.BILINEAR,
            skipped=Skipped(),
        )


def test_all_images_bad_is_an_error_that_says_where_to_look(tmp_path: Path) -> None:
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="no usable images"):
        _load(manifest)


def test_split_is_deterministic_by_seed_and_disjoint() -> None:
    train, val = split_indices(100, 0.1, seed=3, max_val=50)
    assert (train, val) == split_indices(100, 0.1, seed=3, max_val=50)
    assert split_indices(100, 0.1, seed=4, max_val=50)[1] != val
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert len(split_indices(100, 0.5, seed=3, max_val=7)[1]) == 7
    assert len(split_indices(2, 0.01, seed=0, max_val=5)[1]) == 1


def test_manifest_splits_keep_captions_with_their_image(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    rows = []
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(folder / f"{i}.png")
        rows += [{"image": f"img/{i}.png", "caption": f"image {i}"}, {"image": f"img/{i}.png", "caption": f"pic {i}"}]
    manifest = tmp_path / "d.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = open_splits(
        str(manifest),
        image_root=None,
        size=SIZE,
        resample=Image.Resampling.BILINEAR,
        seed=0,
        val_fraction=0.25,
        max_val_images=100,
        shapes_train_size=1,
        shapes_val_size=1,
    )
    assert len(splits.train) == 15 and len(splits.val) == 5
    val_captions = {c for i in range(len(splits.val)) for c in splits.val.captions(i)}
    train_captions = {c for i in range(len(splits.train)) for c in splits.train.captions(i)}
    assert not val_captions & train_captions
    assert splits.describe()["val"]["split"] == "val"


def test_a_failing_store_stops_loading_but_a_missing_or_forbidden_object_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from captionfleet.trainer.data import Pair, load_pairs

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), "red").save(good)

    def store(answers: dict[str, Exception]) -> object:
        def read(ref: str) -> bytes:
            if ref in answers:
                raise answers[ref]
            return good.read_bytes()

        return lambda _s3: read

    def error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    pairs = [Pair(f"s3://b/{name}.png", ("a caption",)) for name in ("ok", "gone", "denied", "later")]
    monkeypatch.setattr(
        "captionfleet.trainer.data._reader",
        store({"s3://b/gone.png": error("NoSuchKey", 404), "s3://b/denied.png": error("AccessDenied", 403)}),
    )
    skipped = Skipped()
    data = load_pairs(pairs, size=SIZE, resample=Image.Resampling.BILINEAR, source="s3", skipped=skipped, threads=2)
    assert len(data) == 2 and skipped.as_dict()["by_reason"] == {"missing": 1, "unreadable": 1}

    for failure in (error("InternalError", 500), error("SlowDown", 503), EndpointConnectionError(endpoint_url="x")):
        monkeypatch.setattr("captionfleet.trainer.data._reader", store({"s3://b/later.png": failure}))
        with pytest.raises(DataError, match="the store failed, not this image"):
            load_pairs(pairs, size=SIZE, resample=Image.Resampling.BILINEAR, source="s3", skipped=Skipped(), threads=2)
