"""Training data: the train / dev class split, the dev retrieval task, images in memory and
the P x K batches of an epoch."""

from pathlib import Path

import numpy as np
from tqdm import tqdm

from stages.common import logger
from stages.common.images import ImageReadError, read_image, resize_max_side


def split_classes(classes: dict[str, list], n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    """Holds out whole classes for validation.

    Args:
        classes: {class id: images}; only classes with 2+ images can be dev classes (one
            reference plus at least one query).
        n_dev: number of dev classes (0 for none).
        seed: the choice is a seeded permutation of the sorted class ids.

    Returns:
        (train class ids, dev class ids), both sorted and disjoint.

    Raises:
        ValueError: fewer than 2 classes would be left for training, or not enough
            classes with 2+ images for the dev split.
    """
    names = sorted(classes)
    eligible = [c for c in names if len(classes[c]) >= 2]
    if n_dev > len(eligible):
        raise ValueError(f"{n_dev} dev classes requested but only {len(eligible)} classes have 2+ images")
    rng = np.random.default_rng(seed)
    dev = sorted(eligible[i] for i in rng.permutation(len(eligible))[:n_dev])
    train = [c for c in names if c not in set(dev)]
    if len(train) < 2:
        raise ValueError(f"{len(names)} classes with {n_dev} held out leaves {len(train)} for training; need 2+")
    return train, dev


def dev_queries_and_references(dev: dict[str, list[Path]]):
    """Turns dev classes into a retrieval task.

    Per class, the reference is the first file whose stem starts with "reference" (the
    clean scan in the hackathon layout), else the first file; the others are queries.
    Names are ``<class>/<stem>``.

    Returns:
        (queries {name: path}, references {name: path}, ground truth {query: {reference}}).
    """
    queries, references, truth = {}, {}, {}
    for label in sorted(dev):
        paths = sorted(dev[label])
        ref = next((p for p in paths if p.stem.lower().startswith("reference")), paths[0])
        ref_name = f"{label}/{ref.stem}"
        references[ref_name] = ref
        for p in paths:
            if p != ref:
                queries[f"{label}/{p.stem}"] = p
                truth[f"{label}/{p.stem}"] = {ref_name}
    return queries, references, truth


def load_dev(dev: dict[str, list[Path]], max_side: int) -> dict:
    """The dev retrieval task with its images in memory (see `dev_queries_and_references`).

    Returns:
        {"queries": {name: uint8 rgb}, "references": {name: uint8 rgb}, "truth": {query: {ref}}},
        images downsized to `max_side`; unreadable ones left out.
    """
    q, r, truth = dev_queries_and_references(dev)
    names = list(q) + list(r)
    rgbs = dict(zip(names, load_images(list(q.values()) + list(r.values()), max_side, "reading dev images"),
                    strict=True))
    out = {"queries": {n: rgbs[n] for n in q if rgbs[n] is not None},
           "references": {n: rgbs[n] for n in r if rgbs[n] is not None}, "truth": truth}
    logger.info("dev split: %d queries, %d references", len(out["queries"]), len(out["references"]))
    return out


def load_images(paths, max_side: int, desc: str) -> list[np.ndarray | None]:
    """Reads and downsizes images (None for unreadable ones, logged)."""
    out = []
    for p in tqdm(paths, desc=desc, unit="img", leave=False, disable=None):
        try:
            out.append(resize_max_side(read_image(p), max_side)[0])
        except ImageReadError as e:
            logger.warning("skipping unreadable training image %s", e)
            out.append(None)
    return out


def load_training_images(classes: dict[str, list[Path]], class_ids: list[str],
                         max_side: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The readable images of the training classes, in memory.

    Args:
        classes: {class id: image paths}.
        class_ids: the training classes; class ``class_ids[i]`` gets label i.
        max_side: images are downsized to this longest side, pixels.

    Returns:
        (uint8 [H, W, 3] images, int32 [N] labels); unreadable images are left out.
    """
    paths, labels = [], []
    for i, c in enumerate(class_ids):
        paths += classes[c]
        labels += [i] * len(classes[c])
    images = load_images(paths, max_side, "reading training images")
    ok = [i for i, im in enumerate(images) if im is not None]
    return [images[i] for i in ok], np.array([labels[i] for i in ok], np.int32)


def epoch_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches of P classes x K images covering every image once per epoch.

    Each class's images are shuffled and cut into chunks of K (the last chunk topped up
    with other images of the class, with repeats if the class has fewer than K). Each
    batch takes one chunk from each of P distinct classes, preferring classes with the
    most chunks left; when fewer than P classes have chunks left, the batch is filled
    with fresh chunks of random other classes, so every batch holds exactly P * K images.

    Args:
        labels: int [N] class index of each image.
        p: classes per batch (capped at the number of classes).
        k: images per class.
        rng: the epoch's random generator.

    Returns:
        [int64 [P*K] image indices] per step.
    """
    classes = np.unique(labels)
    p = min(p, len(classes))

    def chunk_of(members, head):
        extra = rng.choice(members, k - len(head), replace=len(members) < k) if len(head) < k else []
        return np.concatenate([head, extra]).astype(np.int64)

    chunks = {}
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        chunks[c] = [chunk_of(members, members[i:i + k]) for i in range(0, len(members), k)]
    batches = []
    while any(chunks.values()):
        left = [c for c in classes if chunks[c]]
        order = sorted(left, key=lambda c: (-len(chunks[c]), rng.random()))
        chosen = order[:p]
        parts = [chunks[c].pop() for c in chosen]
        others = [c for c in classes if c not in set(chosen)]
        for c in rng.permutation(others)[: p - len(chosen)]:
            parts.append(chunk_of(np.flatnonzero(labels == c), np.zeros(0, np.int64)))
        batches.append(np.concatenate(parts))
    return [batches[i] for i in rng.permutation(len(batches))]
