"""Where the heavy loops of a run execute: global extraction, local extraction and
verification. `pipeline.run` calls them through an engine; everything else (ranking,
calibration fit, merge, outputs) runs in the calling process whatever the engine.

- `LocalEngine` (``--engine local``, the default): the stage `main`s in this process,
  verification on `workers` joblib processes.
- `pipeline.ray_engine.RayEngine` (``--engine ray``): the same stage `main`s run by Ray
  actors, each on a shard (``shard=(i, n)``) of the images or queries, writing into the
  same cache stores. Ray is imported only when this engine is chosen.
"""

from pathlib import Path
from typing import Protocol

from stages.common.conf import conf_hash
from stages.global_embed import extract as global_extract
from stages.local_delf import extract as local_extract
from stages.rerank import verify as rerank_verify

ENGINES = ("local", "ray")
RAY_INSTALL_HINT = "pip install -r requirements-ray.txt"


class EngineError(RuntimeError):
    """Work on the engine failed beyond what the stages handle themselves (a worker that
    died, a stage error on a worker). Finished shards stay cached: a rerun resumes."""


class EngineUnavailable(EngineError):
    """The engine cannot be used at all here: not installed, or its cluster unreachable."""


class Engine(Protocol):
    """What `pipeline.run` needs of an engine: the three heavy stage calls, each returning
    the store folder the stage wrote (arguments as in the stages' `main`); `start` (also
    done by the first call) and `close`."""

    name: str

    def global_extract(self, conf: dict, images: dict[str, Path], cache_root: Path,
                       overwrite: bool = False) -> Path: ...

    def local_extract(self, conf: dict, pairs_path: Path, images: dict[str, Path], cache_root: Path,
                      overwrite: bool = False, pca_source=None) -> Path: ...

    def verify(self, conf: dict, pairs_path: Path, local_store_dir: Path, cache_root: Path,
               overwrite: bool = False) -> Path: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


class LocalEngine:
    """Runs the stages in this process: today's path.

    Args:
        workers: joblib processes for verification.
    """

    name = "local"

    def __init__(self, workers: int = 2):
        self.workers = workers
        self._backends: dict[str, local_extract.LazyBackend] = {}

    def global_extract(self, conf: dict, images: dict[str, Path], cache_root: Path, overwrite: bool = False) -> Path:
        """`stages.global_embed.extract.main` on every image; returns the store folder."""
        return global_extract.main(conf, images, cache_root, overwrite)

    def local_extract(self, conf: dict, pairs_path: Path, images: dict[str, Path], cache_root: Path,
                      overwrite: bool = False, pca_source=None) -> Path:
        """`stages.local_delf.extract.main` on a shortlist, with one backend per conf for the
        whole run (the shortlist windows and the calibration pairs load it once)."""
        key = conf_hash(conf, str(cache_root))
        backend = self._backends.setdefault(key, local_extract.LazyBackend(conf, cache_root))
        return local_extract.main(conf, pairs_path, images, cache_root, overwrite, backend=backend,
                                  pca_source=pca_source)

    def verify(self, conf: dict, pairs_path: Path, local_store_dir: Path, cache_root: Path,
               overwrite: bool = False) -> Path:
        """`stages.rerank.verify.main` on a shortlist; returns the inlier store folder."""
        return rerank_verify.main(conf, pairs_path, local_store_dir, cache_root, overwrite, self.workers)

    def start(self) -> None:
        pass

    def close(self) -> None:
        self._backends.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_engine(name: str, workers: int | None = None, address: str | None = None, worker_cpus: int = 1):
    """The engine called `name`; nothing is started yet (Ray starts on first use).

    Args:
        name: "local" or "ray".
        workers: local: verification processes (default 2); ray: actors (default: one per
            `worker_cpus` CPUs of the cluster; without `address`, a local Ray of this many
            CPUs, default every core).
        address: ray: the address of a running cluster (``ray start --head`` prints it;
            "auto" finds one started on this machine); None starts a local Ray.
        worker_cpus: ray: CPUs each actor reserves and its TensorFlow/OpenCV/BLAS threads.

    Raises:
        EngineUnavailable: "ray" without Ray installed (the message says how to install it).
        ValueError: an unknown engine name.
    """
    if name == "local":
        return LocalEngine(workers or 2)
    if name == "ray":
        try:
            from . import ray_engine
        except ImportError as e:
            if (e.name or "").split(".")[0] != "ray":
                raise
            raise EngineUnavailable(f"--engine ray needs Ray, which is not installed in this Python ({e}); "
                                    f"install it with: {RAY_INSTALL_HINT}") from e
        return ray_engine.RayEngine(workers=workers, address=address, worker_cpus=worker_cpus)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
