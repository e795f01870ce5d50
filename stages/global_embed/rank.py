"""Stage 1c: whitening and the global ranking of every reference for every query.

Reads the global descriptors (`extract`), learns the whitening the conf asks for, applies
database-side augmentation and query expansion when the conf asks (`expansion`; DBA is on by
default), ranks all references for every query (`search.rank_all`, faiss) and writes, into
the output folder:

- ``global_ranking.npz``: each query's first ``keep`` references and scores, and the
  descriptors that regenerate the rest of its ranking (`stages.common.shortlist.save_ranking`,
  `RankingFile`): memory and file grow as Q x keep, not Q x R;
- ``pairs-global-top{k}.txt``: the top-k shortlist that stages 2 and 3 read;
- ``reference_descriptors.npz``: "ref_names" str [R], "descriptors" float16 [R, D], the
  reference descriptors as ranked (whitened, after DBA; zero rows for unreadable ones),
  for stage 3's verified query expansion;
- ``skipped.json``: the unreadable queries and references and why
  ({"queries": {name: reason}, "references": {name: reason}}). An unreadable reference is
  ranked last (in name order) in every list and left out of the shortlist; an unreadable
  query gets the references in name order and no shortlist.

`calibration_pairs` writes the same kind of shortlist among training images, whose answers
are known, for stage 3 to learn what its verification scores mean on this data.
"""

import argparse
from pathlib import Path

import numpy as np

from stages.common import logger, matrix, setup_logging
from stages.common.cache import FeatureStore, atomic_save_npz, atomic_write_json
from stages.common.conf import resolve
from stages.common.dataset import Dataset
from stages.common.pca import apply_whitening, learn_pca_whitening
from stages.common.shortlist import complete_orders, save_ranking, similarities, write_pairs

from . import expansion, search
from .whitening import learn_cached, learn_pair_whitening

WHITENINGS = ("auto", "learned", "pca", "none")

default_conf = {
    "top_k": 100,  # shortlist length per query handed to stages 2 and 3
    # positions of each query's ranking kept in global_ranking.npz (the pipeline's expand_to:
    # the deepest window verified); the rest is regenerated from the stored descriptors
    "keep": 400,
    # auto: learned from the training classes' matching pairs when there are any and the
    # descriptors come from ImageNet weights; none with a trained model or no training data.
    "whitening": "auto",
    "whiten_dim": 512,
    "query_regions": True,  # a reference scores the best of the query's region descriptors
    **expansion.default_conf,  # DBA over the references, alpha-QE (off); see `expansion`
}
EXPANSION_KEYS = tuple(expansion.default_conf)
REFERENCE_DESCRIPTORS = "reference_descriptors.npz"  # the references as ranked (whitened, after DBA)

# Training pairs for the verification calibration (stage 3, `stages.rerank.calibrate`):
# from `classes` classes (evenly spaced by name), `queries_per_class` images are queries and
# up to `gallery_per_class` others the gallery; each query is paired with its `top_k` most
# similar gallery images, as a test query is with its shortlist.
calibration_conf = {"classes": 30, "queries_per_class": 2, "gallery_per_class": 6, "top_k": 20, "seed": 0}

confs = {
    "auto": {},
    "learned": {"whitening": "learned"},
    "pca": {"whitening": "pca"},
    "none": {"whitening": "none"},
}


def whitening_mode(conf: dict, global_conf: dict) -> str:
    """The whitening the conf asks for, after the "auto" rule for trained models.

    A trained model's projection head is already learned on the training classes; whitening
    learned again on those classes overfits them (smvs_dvd: mAP 0.68 -> 0.62), so "auto"
    means "none" with one (`global_conf["weights_dir"]` set).

    Raises:
        ValueError: an unknown whitening name.
    """
    mode = conf["whitening"]
    if mode not in WHITENINGS:
        raise ValueError(f"unknown whitening {mode!r}; choose one of {WHITENINGS}")
    return "none" if mode == "auto" and global_conf.get("weights_dir") else mode


def needs_training_images(conf: dict, global_conf: dict) -> bool:
    """Whether the ranking reads descriptors of the training images (to learn whitening)."""
    return whitening_mode(conf, global_conf) in ("auto", "learned")


def learn_whitening(mode: str, dim: int, ref_desc: np.ndarray, train_desc: np.ndarray | None,
                    train_labels, cache_dir: Path | None = None) -> tuple[str, dict | None]:
    """Chooses and learns the whitening of `mode`.

    "auto" learns from matching pairs of the training classes when there are any, and
    applies none otherwise (`whitening_mode` also picks none with a trained model); "learned"
    demands training pairs; "pca" learns PCA whitening on the references (unsupervised).
    With `cache_dir`, a whitening learned before from the same descriptors is read back
    instead (`learn_cached`).

    Args:
        mode: "auto", "learned", "pca" or "none".
        dim: dimensions kept.
        ref_desc: float32 [R, D] reference descriptors (for "pca", and for "learned" the
            axes beyond what the training images span: `learn_pair_whitening`).
        train_desc: float32 [N, D] training-image descriptors, or None.
        train_labels: [N] class of each training descriptor.
        cache_dir: where learned whitenings are kept, or None.

    Returns:
        (the mode applied, whitening dict {"mean" [D], "projection" [dim, D]} or None).

    Raises:
        ValueError: "learned" without a class that has two training images.
    """
    has_pairs = train_desc is not None and len(train_desc) > 1 and len(set(train_labels)) < len(train_labels)
    if mode == "learned" or (mode == "auto" and has_pairs):
        if not has_pairs:
            raise ValueError("--whitening learned needs train/train_data/<class>/ with 2+ images in a class")
        return "learned", learn_cached(cache_dir, learn_pair_whitening, train_desc, list(train_labels), dim,
                                       complete_with=None if ref_desc is None else np.asarray(ref_desc, np.float32))
    if mode == "pca":
        if len(ref_desc) < 2:
            logger.warning("PCA whitening needs 2+ readable references, %d found: no whitening", len(ref_desc))
            return "none", None
        return "pca", learn_cached(cache_dir, learn_pca_whitening, ref_desc, dim, shrinkage=0.5)
    return "none", None


def shortlist_globally(query_names, ref_names, features: dict, whitening: dict | None = None,
                       query_regions: bool = True, expand: dict | None = None,
                       keep: int | None = None) -> dict[str, np.ndarray]:
    """Each query's first `keep` references by global descriptor similarity, and the
    descriptors that regenerate the rest of its ranking.

    References without a descriptor (unreadable) are ranked last, in name order; a query
    without one gets the references in name order.

    Args:
        query_names: [Q] names; ref_names: [R] names.
        features: {name: {"descriptor": float32 [D], "region_descriptors": [G, D]}} for
            the readable images.
        whitening: applied to every descriptor when given (`apply_whitening`).
        query_regions: score a reference by the best of the query's region descriptors.
        expand: "dba_k", "dba_alpha", "dba_iterations", "qe_k", "qe_alpha" (`expansion`),
            applied after the whitening; None: neither.
        keep: positions kept per query (None: all R).

    Returns:
        {"order" int32 [Q, E], "scores" float32 [Q, E] (-inf where no score exists), E =
        min(keep, R); the `save_ranking` descriptors "query_descriptors" float32 [Q', G, D],
        "query_rows" int64 [Q'], "ref_descriptors" float32 [R', D], "ref_columns" int64
        [R'] (the readable ones, as ranked: whitened, augmented); "ranked_refs" float32
        [R, D] the reference descriptors with zero rows for unreadable ones (D = 0 when
        none has one)}.
    """
    n_refs = len(ref_names)
    depth = n_refs if keep is None else min(keep, n_refs)
    ok_refs = np.array([i for i, n in enumerate(ref_names) if n in features], dtype=np.int64)
    ok_queries = np.array([i for i, n in enumerate(query_names) if n in features], dtype=np.int64)
    order = np.tile(np.arange(depth, dtype=np.int32), (len(query_names), 1))
    scores = np.full(order.shape, -np.inf, np.float32)
    out = {"order": order, "scores": scores, "query_rows": ok_queries, "ref_columns": ok_refs}
    if len(ok_refs) == 0 or len(ok_queries) == 0:
        return {**out, "query_descriptors": np.zeros((0, 1, 0), np.float32),
                "ref_descriptors": np.zeros((len(ok_refs), 0), np.float32),
                "query_rows": ok_queries[:0], "ranked_refs": np.zeros((n_refs, 0), np.float32)}
    _, ref_desc = reference_descriptors(ref_names, features, whitening, expand)
    query_desc = np.ascontiguousarray(query_descriptors([features[query_names[i]] for i in ok_queries], ref_desc,
                                                        whitening, query_regions, expand))
    sub_order, sub_scores = search.shortlist_all(query_desc, ref_desc, depth)
    n_top = sub_order.shape[1]  # min(depth, readable references)
    failed_refs = np.setdiff1d(np.arange(n_refs), ok_refs).astype(np.int32)
    order[ok_queries[:, None], np.arange(n_top)] = ok_refs[sub_order]
    order[ok_queries[:, None], np.arange(n_top, depth)] = failed_refs[:depth - n_top]
    scores[ok_queries[:, None], np.arange(n_top)] = sub_scores
    ranked_refs = np.zeros((n_refs, ref_desc.shape[1]), np.float32)
    ranked_refs[ok_refs] = ref_desc
    return {**out, "query_descriptors": query_desc, "ref_descriptors": ref_desc, "ranked_refs": ranked_refs}


def rank_globally(query_names, ref_names, features: dict, whitening: dict | None = None,
                  query_regions: bool = True, expand: dict | None = None, with_references: bool = False,
                  keep: int = 400):
    """Ranks every reference for every query by global descriptor similarity, in full.

    The ranking the pipeline writes: `shortlist_globally` to `keep` positions, the rest
    regenerated as `stages.common.shortlist.RankingFile.full` does. For small sets (the
    training calibration, a dev set): memory grows as Q x R.

    Args:
        query_names, ref_names, features, whitening, query_regions, expand: as
            `shortlist_globally`.
        with_references: also return the reference descriptors the ranking used.
        keep: positions ranked by the faiss search.

    Returns:
        (order int32 [Q, R], scores float32 [Q, R]; -inf where no score exists), and with
        `with_references` the reference descriptors float32 [R, D] as ranked (whitened,
        augmented; zero rows for references without a descriptor, D = 0 when none has one).
    """
    short = shortlist_globally(query_names, ref_names, features, whitening, query_regions, expand, keep)
    order, scores = full_ranking(short, len(ref_names))
    return (order, scores, short["ranked_refs"]) if with_references else (order, scores)


def full_ranking(short: dict[str, np.ndarray], n_refs: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """int32 [Q, R] order and float32 [Q, R] scores of every query from a
    `shortlist_globally` result (`RankingFile.full`'s rule)."""
    n_queries, depth = short["order"].shape
    if depth == n_refs:
        return short["order"], short["scores"]
    order = np.tile(np.arange(n_refs, dtype=np.int32), (n_queries, 1))
    scores = np.full(order.shape, -np.inf, np.float32)
    rows, ref_t = short["query_rows"], np.ascontiguousarray(short["ref_descriptors"].T)
    for start in range(0, len(rows), batch):
        sel = rows[start:start + batch]
        block = short["query_descriptors"][start:start + batch]
        o, s = complete_orders(short["order"][sel], similarities(block, ref_t), short["ref_columns"], n_refs)
        s[:, :depth] = short["scores"][sel]
        order[sel], scores[sel] = o, s
    return order, scores


def _learn_for(conf: dict, mode: str, store: FeatureStore, features: dict, references, train, labels: dict):
    """`learn_whitening` on the readable `references` and `train` images of `features`
    (cached in the store's ``whitening`` folder): (applied mode, whitening dict or None)."""
    ok_train = [k for k in train if k in features]
    return learn_whitening(
        mode, conf["whiten_dim"],
        np.stack([features[n]["descriptor"] for n in references if n in features] or [np.zeros(1)]),
        np.stack([features[k]["descriptor"] for k in ok_train]) if ok_train else None,
        [labels[k] for k in ok_train], store.dir / "whitening")


def learn_reference_side(conf: dict, store: FeatureStore, references: dict[str, Path],
                         train: dict[str, Path], labels: dict[str, str]):
    """The whitening and post-processing `main` applies, learned the same way, for a
    persistent index (`pipeline.index`): only references and training images are read.

    Args:
        conf: the ranking conf (see `default_conf`).
        store: the global descriptor store holding `references` and `train`.
        references: {reference name: path}, in ranking order.
        train: {training key: path} (`Dataset.training_images`; {} without whitening to learn).
        labels: {training key: class}.

    Returns:
        (features {name: arrays} of the readable images, errors {name: reason} of the
        unreadable references, whitening applied ("learned", "pca", "none"), whitening dict or
        None, expand: the post-processing conf as `main` applies it, DBA off without whitening).

    Raises:
        ValueError: as `learn_whitening`.
    """
    mode = whitening_mode(conf, store.conf)
    images = {**references, **train}
    features, errors = load_descriptors(store, images)
    applied, whitening = _learn_for(conf, mode, store, features, references, train, labels)
    expand = {k: conf[k] for k in EXPANSION_KEYS}
    if applied == "none":
        expand["dba_k"] = 0  # as `main`: DBA needs whitened descriptors
    return features, {n: errors[n] for n in references if n in errors}, applied, whitening, expand


def reference_descriptors(ref_names, features: dict, whitening: dict | None, expand: dict | None) -> tuple:
    """The reference side of `rank_globally`: whitened, then DBA (when `expand` asks).

    Returns:
        (ok int64 [R'] indices into `ref_names` of the references with a descriptor,
         float32 [R', D] their descriptors as `rank_globally` ranks them).
    """
    ok = np.array([i for i, n in enumerate(ref_names) if n in features], dtype=np.int64)
    if len(ok) == 0:
        return ok, np.zeros((0, 0), np.float32)
    ref_desc = np.stack([features[ref_names[i]]["descriptor"] for i in ok])
    if whitening is not None:
        ref_desc = apply_whitening(ref_desc, whitening)
    if expand:
        ref_desc = expansion.database_side_augmentation(ref_desc, expand["dba_k"], expand["dba_alpha"],
                                                        expand["dba_iterations"])
    return ok, np.ascontiguousarray(ref_desc, np.float32)


def query_descriptors(query_features: list[dict], ref_desc: np.ndarray, whitening: dict | None,
                      query_regions: bool = True, expand: dict | None = None) -> np.ndarray:
    """The query side of `rank_globally`: whitened region (or whole-image) descriptors,
    then alpha-QE against `ref_desc` (the `reference_descriptors` output) when `expand` asks.

    Args:
        query_features: [Q] global entries {"descriptor" [D], "region_descriptors" [G, D]}.
        ref_desc: float32 [R', D] references as ranked.
        whitening, query_regions, expand: as in `rank_globally`.

    Returns:
        float32 [Q, G, D] (G = 1 without query regions).
    """
    key = "region_descriptors" if query_regions else "descriptor"
    query_desc = np.stack([np.atleast_2d(f[key]) for f in query_features])
    if whitening is not None:
        query_desc = apply_whitening(query_desc.reshape(-1, query_desc.shape[-1]), whitening).reshape(
            query_desc.shape[0], query_desc.shape[1], -1)
    if expand:
        query_desc = expansion.alpha_query_expansion(query_desc, ref_desc, expand["qe_k"], expand["qe_alpha"])
    return np.asarray(query_desc, np.float32)


def write_ranking(out_dir: Path, query_names: list[str], ref_names: list[str], order: np.ndarray,
                  scores: np.ndarray, top_k: int, unranked: set[str] = frozenset(),
                  descriptors: dict[str, np.ndarray] | None = None) -> tuple[Path, Path]:
    """Writes ``global_ranking.npz`` (`save_ranking`: order and scores [Q, E], and with E <
    R the `descriptors` that regenerate the rest) and the shortlist
    ``pairs-global-top{k}.txt`` (tab-separated "query<TAB>reference" lines, `write_pairs`).
    Names in `unranked` (unreadable images) are left out of the shortlist: queries
    entirely, references from every query's top-k.

    Returns:
        (ranking path, pairs path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranking_path = save_ranking(out_dir / "global_ranking.npz", query_names, ref_names, order, scores, descriptors)
    pairs_path = out_dir / f"pairs-global-top{top_k}.txt"
    write_pairs(pairs_path, [(q, ref_names[j]) for i, q in enumerate(query_names) if q not in unranked
                             for j in order[i, :top_k] if ref_names[j] not in unranked])
    return ranking_path, pairs_path


def report_skipped(store: FeatureStore, errors: dict[str, str], images: dict[str, Path],
                   since: float | None) -> None:
    """Logs the unreadable images whose verdict came from the cache (entries written
    before `since`, a time.time(); all of them when None); those read in this run were
    logged as they failed."""
    for name, reason in errors.items():
        try:
            fresh = since is not None and store.path(name).stat().st_mtime >= since
        except OSError:
            fresh = False
        if not fresh:
            logger.warning("skipping unreadable image %s: %s (recorded in the cache)", images[name], reason)


def load_descriptors(store: FeatureStore, images: dict[str, Path], with_regions=()) -> tuple[dict, dict]:
    """The global descriptors of `images` from the store's matrix files (`stages.common.matrix`:
    one file per array instead of one entry per image), checked against their source files.

    Args:
        store: the global descriptor store.
        images: {name: source path}.
        with_regions: names that also need their "region_descriptors" (the queries).

    Returns:
        ({name: {"descriptor": float32 [D], and for `with_regions` "region_descriptors"
        float32 [G, D]}} for the usable entries, {name: reason} for the others).
    """
    names, rows, errors = matrix.load_rows(store, images, "descriptor")
    features = {n: {"descriptor": rows[i]} for i, n in enumerate(names)}
    regions = {n: images[n] for n in with_regions if n in features}
    if regions:
        names, rows, region_errors = matrix.load_rows(store, regions, "region_descriptors")
        for i, n in enumerate(names):
            features[n]["region_descriptors"] = rows[i]
        for n, reason in region_errors.items():
            features.pop(n, None)
            errors[n] = reason
    return features, errors


def main(conf: dict, features_dir: Path, dataset: Dataset, out_dir: Path,
         since: float | None = None) -> tuple[Path, Path]:
    """Ranks every reference of `dataset` for every query from cached global descriptors.

    Args:
        conf: the ranking conf (see `default_conf`).
        features_dir: the global descriptor store (`extract.main`), holding every query and
            reference and, when the whitening is learned, the training images.
        dataset: the data set (queries, references, training classes).
        out_dir: where the ranking, the shortlist and ``skipped.json`` are written.
        since: a time.time() at which this run's extraction started; unreadable images
            recorded in the cache before it are logged here (all of them when None).

    Returns:
        (``global_ranking.npz`` path, ``pairs-global-top{k}.txt`` path).

    Raises:
        ValueError: whitening "learned" without training pairs, or an unknown whitening.
    """
    logger.info("global ranking, conf: %s", conf)
    store = FeatureStore.open(Path(features_dir))
    mode = whitening_mode(conf, store.conf)
    train, labels = dataset.training_images() if needs_training_images(conf, store.conf) else ({}, {})
    images = {**dataset.images, **train}
    features, errors = load_descriptors(store, images, dataset.queries if conf["query_regions"] else ())
    report_skipped(store, errors, images, since)
    query_names, ref_names = list(dataset.queries), list(dataset.references)
    applied, whitening = _learn_for(conf, mode, store, features, ref_names, train, labels)
    note = ""
    if applied == "none" and conf["whitening"] == "auto":
        note = (" (a trained model's projection head replaces it)" if mode == "none"
                else " (no training class with 2+ images to learn it from)")
    logger.info("global whitening: %s%s", applied, note)
    expand = {k: conf[k] for k in EXPANSION_KEYS}
    if applied == "none" and expand["dba_k"]:
        # Unwhitened (and trained-head) descriptors give unrelated images high cosines, so
        # DBA averages them in: smvs_dvd 0.189 -> 0.124 unwhitened, 0.681 -> 0.516 trained.
        logger.info("global post-processing: no database-side augmentation (it needs whitened descriptors)")
        expand["dba_k"] = 0
    if expand["dba_k"] or expand["qe_k"]:
        logger.info("global post-processing: database-side augmentation k=%d alpha=%g (x%d) over the references, "
                    "alpha query expansion k=%d alpha=%g", expand["dba_k"], expand["dba_alpha"],
                    expand["dba_iterations"], expand["qe_k"], expand["qe_alpha"])
    short = shortlist_globally(query_names, ref_names, features, whitening, conf["query_regions"], expand,
                               max(conf["keep"], conf["top_k"]))
    ref_desc = short.pop("ranked_refs")
    out_dir = Path(out_dir)
    paths = write_ranking(out_dir, query_names, ref_names, short.pop("order"), short.pop("scores"), conf["top_k"],
                          set(errors), short)
    # for stage 3's verified query expansion (`stages.rerank.verified_qe`)
    atomic_save_npz(out_dir / REFERENCE_DESCRIPTORS, {"ref_names": np.array(ref_names, dtype=str),
                                                      "descriptors": ref_desc.astype(np.float16)})
    atomic_write_json(out_dir / "skipped.json", {
        "queries": {n: errors[n] for n in query_names if n in errors},
        "references": {n: errors[n] for n in ref_names if n in errors}})
    return paths


def calibration_classes(dataset: Dataset, global_conf: dict) -> list[str]:
    """The training classes calibration pairs may come from: all of them, or with a
    trained model (`global_conf["weights_dir"]`) only the dev classes it held out, since
    the classes it was trained on would look easier than unseen ones."""
    if not global_conf.get("weights_dir"):
        return sorted(dataset.train)
    from stages.common.backbone.model_dir import read_config

    return sorted(set(read_config(global_conf["weights_dir"]).get("classes", {}).get("dev", [])) & set(dataset.train))


def _sample_calibration_images(names_by_class: dict[str, list[str]], conf: dict) -> tuple[list[str], list[str]]:
    classes = sorted(c for c, names in names_by_class.items() if len(names) >= 2)
    if len(classes) > conf["classes"]:
        classes = [classes[i] for i in np.linspace(0, len(classes) - 1, conf["classes"]).round().astype(int)]
    queries, gallery = [], []
    rng = np.random.default_rng(conf["seed"])
    for c in classes:
        names = [names_by_class[c][i] for i in rng.permutation(len(names_by_class[c]))]
        n_query = min(conf["queries_per_class"], len(names) - 1)
        queries += names[:n_query]
        gallery += names[n_query:n_query + conf["gallery_per_class"]]
    return queries, gallery


def calibration_pairs(conf: dict, features_dir: Path, dataset: Dataset, out_dir: Path,
                      classes: list[str] | None = None) -> tuple[Path, Path] | None:
    """Shortlists among training images, for the verification calibration of stage 3.

    Sampled as `calibration_conf` says; each query's gallery images are ranked by the
    global similarity the test queries get (the conf's whitening and query regions). A
    learned whitening is fitted on the training classes, so a pair's similarity is
    computed with a whitening learned without its classes (two folds of the sampled
    classes, by name order): the calibration then sees the similarities of unseen classes,
    as the test does. DBA and query expansion are left out: among 6 gallery images a class
    their neighbourhoods are unlike the references', and a calibration fitted on such
    similarities undervalued the global score (grocery_store: weight 2.3 instead of 4.4,
    reranked mAP 0.6176 below the global 0.6207; fitted without them, 0.6298).

    Args:
        conf: the ranking conf (see `default_conf`).
        features_dir: the global descriptor store holding the training images.
        dataset: the data set; its training images are keyed as `Dataset.training_images`.
        out_dir: where the two files are written.
        classes: the classes to sample from (default: every training class).

    Returns:
        (``pairs-calibration.txt``, the shortlist for stages 2 and 3;
         ``calibration-pairs.npz``: "queries", "references" str [N], "global_scores"
         float32 [N], "same" bool [N]), or None when fewer than two classes with two
        readable images exist.
    """
    store = FeatureStore.open(Path(features_dir))
    train, labels = dataset.training_images()
    if classes is not None:
        train = {k: p for k, p in train.items() if labels[k] in set(classes)}
    mode = whitening_mode(conf, store.conf)
    references = dataset.references if mode == "pca" else {}
    features, _ = load_descriptors(store, {**train, **references}, train if conf["query_regions"] else ())
    names_by_class: dict[str, list[str]] = {}
    for key in sorted(k for k in features if k in train):
        names_by_class.setdefault(labels[key], []).append(key)
    queries, gallery = _sample_calibration_images(names_by_class, calibration_conf)
    if len({labels[q] for q in queries}) < 2 or not gallery:
        logger.info("verification calibration: fewer than 2 training classes with 2+ readable images")
        return None
    sampled = sorted({labels[k] for k in queries + gallery})
    fold = {c: i % 2 for i, c in enumerate(sampled)}
    scores = np.full((len(queries), len(gallery)), -np.inf, np.float32)
    for f in (0, 1) if mode in ("auto", "learned") else (None,):
        fit_on = [k for k in features if k in train and (f is None or fold.get(labels[k]) != f)]
        _, whitening = learn_whitening(
            mode, conf["whiten_dim"], np.stack([features[n]["descriptor"] for n in references
                                                if n in features] or [np.zeros(1)]),
            np.stack([features[k]["descriptor"] for k in fit_on]), [labels[k] for k in fit_on],
            store.dir / "whitening")
        rows = [i for i, q in enumerate(queries) if f is None or fold[labels[q]] == f]
        order, ranked = rank_globally([queries[i] for i in rows], gallery, features, whitening, conf["query_regions"])
        scores[rows] = np.take_along_axis(ranked, np.argsort(order, axis=1), axis=1)  # back to gallery order
    top = np.argsort(-scores, axis=1, kind="stable")[:, :calibration_conf["top_k"]]
    pairs = [(queries[i], gallery[j]) for i in range(len(queries)) for j in top[i]]
    out_dir = Path(out_dir)
    pairs_path = out_dir / "pairs-calibration.txt"
    write_pairs(pairs_path, pairs)
    arrays_path = out_dir / "calibration-pairs.npz"
    atomic_save_npz(arrays_path, {
        "queries": np.array([q for q, _ in pairs], dtype=str), "references": np.array([r for _, r in pairs], dtype=str),
        "global_scores": np.array([scores[i, j] for i in range(len(queries)) for j in top[i]], np.float32),
        "same": np.array([labels[q] == labels[r] for q, r in pairs], bool)})
    logger.info("verification calibration: %d training queries x %d gallery images of %d classes, %d pairs",
                len(queries), len(gallery), len(sampled), len(pairs))
    return pairs_path, arrays_path


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data folder (hackathon layout)")
    parser.add_argument("--features", type=Path, required=True,
                        help="global descriptor store folder (cache/global/<conf>-<hash>/)")
    parser.add_argument("--output", type=Path, required=True, help="output folder")
    parser.add_argument("--conf", default="auto", choices=sorted(confs), help="named conf: the whitening")
    parser.add_argument("--top-k", type=int, default=default_conf["top_k"], help="shortlist length per query")
    parser.add_argument("--keep", type=int, default=default_conf["keep"],
                        help="positions of each query's ranking kept in global_ranking.npz (the rest is "
                             "regenerated from its descriptors); the pipeline passes its --expand-to")
    parser.add_argument("--whiten-dim", type=int, default=default_conf["whiten_dim"],
                        help="dimensions kept by the whitening")
    parser.add_argument("--no-query-regions", dest="query_regions", action="store_false",
                        help="score references with the whole-query descriptor only")
    expansion.add_arguments(parser)
    parser.add_argument("--no-calibration", action="store_true",
                        help="do not write the training-image shortlist for stage 3's calibration "
                             "(pairs-calibration.txt, calibration-pairs.npz; written when the data has "
                             "training classes)")
    args = parser.parse_args(argv)
    setup_logging()
    from stages.common.dataset import load_dataset

    conf = resolve(default_conf, confs, args.conf,
                   {"top_k": args.top_k, "keep": args.keep, "whiten_dim": args.whiten_dim,
                    "query_regions": args.query_regions,
                    **expansion.conf_from_args(args)})
    dataset = load_dataset(args.data)
    for path in main(conf, args.features, dataset, args.output):
        print(path)
    if dataset.train and not args.no_calibration:
        global_conf = FeatureStore.open(args.features).conf
        for path in calibration_pairs(conf, args.features, dataset, args.output,
                                      calibration_classes(dataset, global_conf)) or ():
            print(path)


if __name__ == "__main__":
    cli()
