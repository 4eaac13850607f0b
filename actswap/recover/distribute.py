"""``--distribute``: the tf.distribute strategy a recovery trains under.

* ``mirrored``: ``tf.distribute.MirroredStrategy`` over the local devices
  (``--cpu-devices N`` first splits the CPU into N logical devices, for
  machines without GPUs and for tests);
* ``multiworker`` is refused: Keras 3's ``fit`` fails under
  ``tf.distribute.MultiWorkerMirroredStrategy`` (keras-team/keras#20585:
  building the model from a distributed batch, then reducing its metrics;
  both measured here with two local workers), and recovery trains with ``fit``.

The global batch is ``--batch-size``: Keras splits each batch across replicas.

Invariant: called before anything else runs TensorFlow in the process
(logical devices and collectives can be configured only then); a bad
configuration is a UserError (exit 2), not a traceback.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError


def make_strategy(kind: str | None, cpu_devices: int | None = None) -> Any:
    import tensorflow as tf

    if cpu_devices is not None:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)]
            )
        except RuntimeError as e:
            raise UserError(f"--cpu-devices: {e}") from None
    if kind is None:
        return None
    if kind == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
            [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise UserError(
        "--distribute multiworker is not available: Keras 3's fit fails under MultiWorkerMirroredStrategy "
        "(keras-team/keras#20585); use --distribute mirrored over this machine's devices"
    )


def replicas(strategy: Any) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)
