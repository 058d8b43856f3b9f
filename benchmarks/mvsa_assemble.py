"""Assemble MVSA-Single in its published layout from two public repositories, and check the cleaned counts.

MVSA-Single (Niu et al., MMM 2016) is no longer served by its authors' site. Its 4,869 images and tweets survive in
the GitHub repository ``Prashant-Tiwari26/Multimodal-Sentiment-Analysis-using-Text-and-Images``
(``Data/Images/<class>/<id>.jpg``, texts in ``Data/Text/Engineered.csv``); that repository's class folders and LABEL
column are a caption-derived relabelling, so they are ignored here. The original annotation file ``labelResultAll.txt``
is in ``Yinan-Xia/PDF`` (``datasets/MVSA_Single/labelResultAll.txt``).

    python benchmarks/mvsa_assemble.py --images-repo CHECKOUT_A --labels-repo CHECKOUT_B --out data/MVSA_Single
    python benchmarks/mvsa_assemble.py ... --multiple-labels THESIS/data/MVSA_Multiple/labelResultAll.txt

writes ``OUT/data/<id>.jpg`` (hard links, or copies across file systems), ``OUT/data/<id>.txt`` and
``OUT/labelResultAll.txt``, then reads the result with :func:`ml_optim_plugins.data.mvsa.read_mvsa` (images checked
too) and compares the cleaned counts with the published ones: 4,511 posts, 2,683 positive, 1,358 negative, 470 neutral.
With ``--multiple-labels`` it also cleans MVSA-Multiple's label file (no images needed) and prints its counts beside the
published 17,024 (Xu and Mao, CIKM 2017). Exit status 1 when a count differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from ml_optim_plugins.data.manifest import row_problem
from ml_optim_plugins.data.mvsa import LABEL_FILE, MVSA_LABELS, clean_mvsa_labels, read_mvsa

PUBLISHED_SINGLE = {"positive": 2683, "negative": 1358, "neutral": 470}
PUBLISHED_MULTIPLE_TOTAL = 17024
IMAGES = Path("Data/Images")
TEXTS = Path("Data/Text/Engineered.csv")
LABELS = Path("datasets/MVSA_Single") / LABEL_FILE


def _link(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def assemble(images_repo: Path, labels_repo: Path, out: Path) -> dict[str, int]:
    """Write the MVSA layout under ``out``; returns how many images, texts and label lines it wrote."""
    label_file = labels_repo / LABELS
    texts_file = images_repo / TEXTS
    for needed in (label_file, texts_file, images_repo / IMAGES):
        if not needed.exists():
            raise FileNotFoundError(f"{str(needed)!r} not found; check out that path of the repository first")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    images = {path.stem: path for path in (images_repo / IMAGES).glob("*/*.jpg")}
    with texts_file.open(newline="", encoding="utf-8", errors="strict") as handle:
        texts = {row["File Name"].removesuffix(".txt"): row["Caption"] for row in csv.DictReader(handle)}
    ids = [line.split("\t")[0] for line in label_file.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    missing = [sample for sample in ids if sample not in images or sample not in texts]
    if missing:
        raise ValueError(f"{len(missing)} labelled IDs lack an image or a text, first {missing[:10]}")
    for sample in ids:
        _link(images[sample], data / f"{sample}.jpg")
        (data / f"{sample}.txt").write_text(texts[sample].strip() + "\n", encoding="utf-8")
    shutil.copyfile(label_file, out / LABEL_FILE)
    return {"images": len(ids), "texts": len(ids), "label_lines": len(ids)}


def clean_multiple(label_file: Path) -> dict[str, object]:
    """Clean MVSA-Multiple's label file (three annotators) without its images: counts per class and per reason."""
    kept: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    lines = label_file.read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        cells = line.strip().split("\t")
        pairs = [tuple(cell.split(",")) for cell in cells[1:]]
        label, reason = clean_mvsa_labels(pairs)  # type: ignore[arg-type]
        if label is None:
            dropped[str(reason)] += 1
        else:
            kept[label] += 1
    return {"samples": len(lines), "kept": dict(kept), "kept_total": sum(kept.values()), "dropped": dict(dropped)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-repo", type=Path, required=True, help="checkout of Prashant-Tiwari26/Multimodal-...")
    parser.add_argument("--labels-repo", type=Path, required=True, help="checkout of Yinan-Xia/PDF")
    parser.add_argument("--out", type=Path, required=True, help="the MVSA-Single root to write")
    parser.add_argument("--multiple-labels", type=Path, help="MVSA-Multiple's labelResultAll.txt, to check its cleaning")
    args = parser.parse_args(argv)
    written = assemble(args.images_repo, args.labels_repo, args.out)
    rows, counts = read_mvsa(args.out, "single")
    bad = [(row.line, problem) for row in rows if (problem := row_problem(row, set(MVSA_LABELS)))]
    report: dict[str, object] = {"written": written, "cleaning": counts, "bad_rows": bad[:10], "published": PUBLISHED_SINGLE}
    ok = counts["kept"] == PUBLISHED_SINGLE and not bad
    if args.multiple_labels:
        multiple = clean_multiple(args.multiple_labels)
        report["multiple"] = {**multiple, "published_total": PUBLISHED_MULTIPLE_TOTAL}
        # Informational: the published count may also drop posts whose files are broken, which needs the images.
    print(json.dumps(report, indent=2))
    print("counts match the published ones" if ok else "COUNTS DIFFER from the published ones", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
