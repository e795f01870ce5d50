"""The Ray engine (``run_pipeline.py --engine ray``): global extraction, local extraction and
verification run as Ray work, everything else in this process.

Each worker is a Ray actor that keeps its models for the whole run (built on first use, so
a fully cached rerun builds none) and runs a stage's own `main` on one shard
(``shard=(i, n)``: every n-th image or query, sorted by name) of a call. The stage code
writes the shard's entries into the usual cache stores, one file per image or query
(temp file and rename), so workers never write the same file, and it logs and records
bad images as it does in one process. Each call is cut into `SHARDS_PER_WORKER` shards per
worker, handed out as workers come free, so a slow machine holds up the run by at most one
small shard.

On a cluster, every machine must see the repository, the data and the cache folder at the
same paths (a shared filesystem) and run the same Python environment.

This module imports Ray at the top: `pipeline.engines.make_engine` imports it only when
the Ray engine is chosen.
"""

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from stages.common import logger, setup_logging
from stages.common.backbone import runtime
from stages.common.conf import conf_hash
from stages.common.progress import Progress
from stages.global_embed import extract as global_extract
from stages.global_embed.models import FeatureModel, load_model, model_identity
from stages.local_delf import extract as local_extract
from stages.rerank import verify as rerank_verify

from .engines import EngineError, EngineUnavailable

REPO = Path(__file__).resolve().parent.parent
SHARDS_PER_WORKER = 4
# A worker process that dies (out of memory, a crash in native code) is restarted and its
# shard retried; the stage resumes from what the shard had cached.
MAX_RETRIES = 2


def _limit_threads(threads: int) -> None:
    """Caps TensorFlow's thread pools and TensorFlow Lite's threads at the CPUs the actor
    reserved (one process per CPU already fills the machine); TensorFlow's are a no-op once
    it has started."""
    import tensorflow as tf

    runtime.configure(threads=threads)

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime is initialised: the first call of this process set them
        pass


class LazyModel(FeatureModel):
    """The global backbone of `conf`, built on first use (`FeatureModel` interface): a
    worker whose shard is fully cached builds no network."""

    def __init__(self, conf: dict, cache_root: Path, threads: int):
        self.conf, self.cache_root, self.threads, self._model = conf, cache_root, threads, None
        self.identity = model_identity(conf)

    def _get(self) -> FeatureModel:
        if self._model is None:
            _limit_threads(self.threads)
            self._model = load_model(self.conf, self.cache_root)
        return self._model

    @property
    def returns_map(self) -> bool:
        return self._get().returns_map

    @property
    def head(self):
        return self._get().head

    def __call__(self, rgb):
        return self._get()(rgb)


class _LazyBackend(local_extract.LazyBackend):
    """`LazyBackend` that caps TensorFlow's threads before it builds a network (the stage
    asks for the backend only when it has an image to describe)."""

    def __init__(self, conf: dict, cache_root: Path, threads: int):
        super().__init__(conf, cache_root)
        self.threads, self._limited = threads, False

    def __call__(self):
        if not self._limited and self.conf["backend"] != "sift":  # SIFT is OpenCV only
            _limit_threads(self.threads)
            self._limited = True
        return super().__call__()


class StageWorker:
    """A Ray actor running stage code on shards; models are kept per conf for the run.

    Args:
        threads: CPUs reserved for this actor: the size of TensorFlow's and OpenCV's pools.
        log_level: level of the package logger (Ray forwards the lines to the driver).
    """

    def __init__(self, threads: int, log_level: int = logging.INFO):
        import cv2

        setup_logging(log_level)
        cv2.setNumThreads(threads)
        self.threads = threads
        self._models: dict[str, LazyModel] = {}
        self._backends: dict[str, _LazyBackend] = {}

    def global_extract(self, conf, images, cache_root, overwrite, shard) -> Path:
        key = conf_hash(conf, str(cache_root))
        model = self._models.setdefault(key, LazyModel(conf, cache_root, self.threads))
        return global_extract.main(conf, images, cache_root, overwrite, shard=shard, model=model)

    def local_extract(self, conf, pairs_path, images, cache_root, overwrite, pca_source, shard) -> Path:
        key = conf_hash(conf, str(cache_root))
        backend = self._backends.setdefault(key, _LazyBackend(conf, cache_root, self.threads))
        return local_extract.main(conf, pairs_path, images, cache_root, overwrite, shard=shard, backend=backend,
                                  pca_source=pca_source)

    def verify(self, conf, pairs_path, local_store_dir, cache_root, overwrite, shard) -> Path:
        # one process per actor: the actors are the parallelism
        return rerank_verify.main(conf, pairs_path, local_store_dir, cache_root, overwrite, workers=1,
                                  backend="threading", shard=shard)


class RayEngine:
    """Runs the heavy stage loops on Ray actors (see the module docstring).

    Args:
        workers: actors to start (default: one per `worker_cpus` CPUs of the cluster).
        address: a running cluster to connect to ("auto", "HOST:6379"); None starts a
            local Ray with `workers` x `worker_cpus` CPUs (default: every core). When Ray
            is already initialised in this process (a test, a notebook), that one is used.
        worker_cpus: CPUs each actor reserves, and the size of its thread pools.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, worker_cpus: int = 1):
        if workers is not None and workers < 1 or worker_cpus < 1:
            raise ValueError(f"workers and worker_cpus must be positive; got {workers} and {worker_cpus}")
        self.workers, self.address, self.worker_cpus = workers, address, worker_cpus
        self._actors: list = []
        self._owns_ray = False

    # -- the engine interface of `pipeline.run` (same signatures as `engines.LocalEngine`)

    def global_extract(self, conf: dict, images: dict[str, Path], cache_root: Path, overwrite: bool = False) -> Path:
        """`stages.global_embed.extract.main`, sharded over the actors."""
        return self._map("global descriptors", "global_extract", conf, _absolute(images),
                         Path(cache_root).absolute(), overwrite)

    def local_extract(self, conf: dict, pairs_path: Path, images: dict[str, Path], cache_root: Path,
                      overwrite: bool = False, pca_source=None) -> Path:
        """`stages.local_delf.extract.main`, sharded over the actors. With a PCA to learn again
        (`pca_source.relearn_since`), shard 0 runs first, alone: it learns the PCA, which
        the other shards then use (they would wait for it on the PCA's lock otherwise)."""
        if pca_source is not None:
            pca_source = dataclasses.replace(pca_source, images=_absolute(pca_source.images))
        first_alone = (pca_source is not None and pca_source.relearn_since is not None
                       and local_extract.BACKENDS[conf["backend"]].needs_pca)
        return self._map("local features", "local_extract", conf, Path(pairs_path).absolute(), _absolute(images),
                         Path(cache_root).absolute(), overwrite, pca_source, first_alone=first_alone)

    def verify(self, conf: dict, pairs_path: Path, local_store_dir: Path, cache_root: Path,
               overwrite: bool = False) -> Path:
        """`stages.rerank.verify.main`, the queries sharded over the actors."""
        return self._map("geometric verification", "verify", conf, Path(pairs_path).absolute(),
                         Path(local_store_dir).absolute(), Path(cache_root).absolute(), overwrite)

    def start(self) -> None:
        """Starts (or connects to) Ray and the actors; the first stage call does it otherwise.

        Raises:
            EngineUnavailable: Ray cannot be started, or the cluster cannot be reached.
        """
        if self._actors:
            return
        if ray.is_initialized():
            logger.info("ray: using the Ray instance this process is connected to")
        else:
            _check_reachable(self.address)
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=True)
                else:
                    cpus = self.workers * self.worker_cpus if self.workers else os.cpu_count() or 1
                    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                hint = ("; if the cluster uses token authentication (the log says InvalidAuthToken), set "
                        "RAY_AUTH_MODE=token and give this machine the cluster's token (`ray get-auth-token` on "
                        "the head node)" if self.address and not os.environ.get("RAY_AUTH_MODE") else "")
                raise EngineUnavailable(f"cannot start or reach {where}: {e}{hint}") from e
            self._owns_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        n = self.workers or max(1, cpus // self.worker_cpus)
        if n * self.worker_cpus > cpus:
            logger.warning("ray: %d workers of %d CPUs need %d CPUs; the cluster has %d: some wait for CPUs",
                           n, self.worker_cpus, n * self.worker_cpus, cpus)
        env = {"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               "OPENBLAS_NUM_THREADS": str(self.worker_cpus),
               runtime.ENV_VAR: os.environ.get(runtime.ENV_VAR, "auto")}
        remote = ray.remote(StageWorker).options(num_cpus=self.worker_cpus, runtime_env={"env_vars": env},
                                                 max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
        self._actors = [remote.remote(self.worker_cpus, logger.getEffectiveLevel()) for _ in range(n)]
        logger.info("ray: %d workers of %d CPU(s) on a cluster of %d CPUs (%d nodes)", n, self.worker_cpus, cpus,
                    len([node for node in ray.nodes() if node.get("Alive")]))

    def close(self) -> None:
        """Stops the actors, and the local Ray when this engine started it."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals

    def _map(self, what: str, method: str, *args, first_alone: bool = False) -> Path:
        """Runs ``StageWorker.<method>(*args, shard=(i, n))`` for every shard, each on the
        next free actor (with `first_alone`, shard 0 before the others); returns the store
        folder the shards wrote to.

        Raises:
            EngineError: a worker died beyond its retries, or the shards disagree on the
                store folder.
            Exception: what the stage raised on a worker (re-raised, so that the
                pipeline handles it as in one process).
        """
        self.start()
        n = len(self._actors) * SHARDS_PER_WORKER
        args = [ray.put(a) if isinstance(a, dict | list) else a for a in args]  # sent once, not once per shard
        folders, errors = set(), []
        start = time.perf_counter()
        logger.info("ray: %s in %d shards on %d workers", what, n, len(self._actors))
        with Progress(n, f"ray: {what}", "shard") as bar:
            for shards in ([[0], list(range(1, n))] if first_alone else [list(range(n))]):
                self._run_shards(method, args, shards, n, folders, errors, bar)
        if errors:
            i, e = errors[0]
            logger.error("ray: %s: %d of %d shards failed (the finished ones are cached; a rerun resumes)",
                         what, len(errors), n)
            if isinstance(e, RayTaskError) and isinstance(e.cause, Exception):
                raise e.cause from e
            raise EngineError(f"{what}: shard {i}/{n} failed: {e}") from e
        if len(folders) != 1:
            raise EngineError(f"{what}: the shards wrote to different stores {sorted(map(str, folders))}")
        logger.info("ray: %s: %d shards in %.1f s", what, n, time.perf_counter() - start)
        return folders.pop()

    def _run_shards(self, method: str, args, shards: list[int], n: int, folders: set, errors: list, bar) -> None:
        """Hands `shards` out to the actors as they come free; collects the folders returned
        and the (shard, exception) of the failed shards."""
        todo, free, running = list(shards), list(self._actors), {}
        while todo or running:
            while todo and free:
                i = todo.pop(0)
                actor = free.pop()
                running[getattr(actor, method).remote(*args, shard=(i, n))] = (i, actor)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ref)
            try:
                folders.add(Path(ray.get(ref)))
                free.append(actor)
            except RayTaskError as e:  # the stage raised on the worker
                errors.append((i, e))
                free.append(actor)
            except RayActorError as e:  # the worker died, also after MAX_RETRIES restarts: not used again
                logger.error("ray: a worker died (%s); %d left", e, len(self._actors) - 1)
                errors.append((i, e))
                self._actors.remove(actor)
                if not self._actors:
                    errors.extend((j, e) for j in todo)
                    todo = []
            bar.update()


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fails fast on a HOST:PORT nobody listens on (Ray itself retries for minutes).

    Raises:
        EngineUnavailable: the port cannot be connected to.
    """
    if not address or "://" in address or address.count(":") != 1:
        return  # "auto", "local", "ray://..." or an IPv6 address: left to Ray
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise EngineUnavailable(f"no Ray cluster at --ray-address {address} ({e}); start one with "
                                "`ray start --head` and pass the address it prints") from e


def _absolute(images: dict[str, Path]) -> dict[str, Path]:
    """Image paths the workers can open from any working directory (symbolic links kept)."""
    return {name: Path(path).absolute() for name, path in images.items()}
