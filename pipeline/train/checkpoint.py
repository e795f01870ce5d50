"""The resume checkpoint, ``MODEL_DIR/checkpoint/`` (not needed for inference):

- ``ckpt-<epoch>.index``, ``ckpt-<epoch>.data-*`` and ``checkpoint``: a `tf.train.Checkpoint`
  of the network (every backbone layer's weights and the head variables) and of both
  optimisers, kept by a `tf.train.CheckpointManager` that holds only the last epoch's;
- ``state.json``: the loop's state after that epoch (epoch, best, bad_epochs, history,
  baseline_dev, run_hash) and the name of the checkpoint it belongs to. It is written
  after the checkpoint, and trusted only while that checkpoint is the manager's latest.
"""

import json
from pathlib import Path

from stages.common import logger
from stages.common.backbone import model_dir as md
from stages.common.cache import atomic_write_json

from .network import Network

STATE = "state.json"


def read_state(model_dir: Path) -> dict | None:
    """The training state of the resume checkpoint in `model_dir`.

    Args:
        model_dir: the model directory.

    Returns:
        The state saved by `TrainingCheckpoint.save` (its "checkpoint" names the saved
        variables), or None when there is none or its checkpoint is not the latest one
        on disk (files deleted, or a run killed between saving the variables and the
        state): such a state does not describe the variables, so it is not resumed.

    Raises:
        ValueError: ``state.json`` is not valid JSON.
    """
    import tensorflow as tf

    folder = Path(model_dir) / md.CHECKPOINT_DIR
    path = folder / STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    latest = tf.train.latest_checkpoint(str(folder))
    if latest is None or Path(latest).name != state.get("checkpoint"):
        logger.warning("%s belongs to checkpoint %s, but the latest checkpoint in %s is %s; not resuming from it",
                       path, state.get("checkpoint"), folder, Path(latest).name if latest else "none")
        return None
    return state


class TrainingCheckpoint:
    """Saves and restores the network and both optimisers in ``MODEL_DIR/checkpoint/``.

    Args:
        model_dir: the model directory.
        net: the network (backbone layers and ``net.v``).
        opt_backbone: keras optimiser of the backbone variables, built, so that its slot
            variables exist when a checkpoint is restored into it.
        opt_head: keras optimiser of the head variables, built.
    """

    def __init__(self, model_dir: Path, net: Network, opt_backbone, opt_head):
        import tensorflow as tf

        self.folder = Path(model_dir) / md.CHECKPOINT_DIR
        self._checkpoint = tf.train.Checkpoint(backbone=net.backbone, variables=net.v,
                                               opt_backbone=opt_backbone, opt_head=opt_head)
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(self.folder), max_to_keep=1)

    def save(self, state: dict) -> None:
        """Saves the variables as ``ckpt-<state["epoch"]>`` (dropping the previous epoch's),
        then `state`, naming that checkpoint, as ``state.json``.

        Args:
            state: JSON-serialisable loop state with an int "epoch".
        """
        path = self._manager.save(checkpoint_number=state["epoch"])
        atomic_write_json(self.folder / STATE, {**state, "checkpoint": Path(path).name})

    def restore(self, state: dict) -> None:
        """Sets every variable from the checkpoint that `state` (from `read_state`) names.

        Raises:
            ValueError: the checkpoint does not hold exactly the variables of this
                network and optimisers.
        """
        try:
            self._checkpoint.restore(str(self.folder / state["checkpoint"])).assert_consumed()
        except AssertionError as e:
            raise ValueError(f"{self.folder}: the checkpoint does not fit the network ({e}); "
                             "pass --overwrite to start over") from e
