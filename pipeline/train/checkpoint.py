"""The resume checkpoint, ``MODEL_DIR/checkpoint/`` (not needed for inference): a
`tf.train.Checkpoint` kept by a `tf.train.CheckpointManager` that holds only the last
epoch's (``ckpt-<epoch>.index``, ``ckpt-<epoch>.data-*`` and the manager's ``checkpoint``
file). It holds the network (every backbone layer's weights and the head variables), both
optimisers, and the loop's state after that epoch (epoch, best, bad_epochs, history,
baseline_dev, run_hash) as a JSON string variable, so variables and state are saved
together: a run killed while saving resumes from the previous epoch's checkpoint.
"""

import json
from pathlib import Path

from stages.common.backbone import model_dir as md

from .network import Network

STATE_KEY = "state/.ATTRIBUTES/VARIABLE_VALUE"


def read_state(model_dir: Path) -> dict | None:
    """The training state of the latest resume checkpoint in `model_dir`, read without
    building the network.

    Args:
        model_dir: the model directory.

    Returns:
        The state saved by `TrainingCheckpoint.save` plus "checkpoint" (the name of the
        checkpoint it belongs to), or None when the folder holds no checkpoint.
    """
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(Path(model_dir) / md.CHECKPOINT_DIR))
    if latest is None:
        return None
    state = json.loads(tf.train.load_variable(latest, STATE_KEY).decode())
    return {**state, "checkpoint": Path(latest).name}


class TrainingCheckpoint:
    """Saves and restores the network, both optimisers and the loop state in
    ``MODEL_DIR/checkpoint/``.

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
        self._state = tf.Variable("", dtype=tf.string, trainable=False)
        self._checkpoint = tf.train.Checkpoint(backbone=net.backbone, variables=net.v, opt_backbone=opt_backbone,
                                               opt_head=opt_head, state=self._state)
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(self.folder), max_to_keep=1)

    def save(self, state: dict) -> None:
        """Saves the variables and `state` as ``ckpt-<state["epoch"]>``, dropping the
        previous epoch's once it is written.

        Args:
            state: JSON-serialisable loop state with an int "epoch".
        """
        self._state.assign(json.dumps({k: v for k, v in state.items() if k != "checkpoint"}))
        self._manager.save(checkpoint_number=state["epoch"])

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
