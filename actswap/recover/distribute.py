"""``--distribute``: the tf.distribute strategy a recovery trains under.

* ``mirrored``: ``tf.distribute.MirroredStrategy`` over the local devices
  (``--cpu-devices N`` first splits the CPU into N logical devices, for
  machines without GPUs and for tests);
* ``multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy``, the cluster
  and this process's place in it read from ``TF_CONFIG`` (one process per
  worker, each running the same command). Keras 3's ``fit`` cannot train
  under it (keras-team/keras#20585), so recovery trains with its own loop
  there (:mod:`.loop`).

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
    if kind != "multiworker":
        raise UserError(f"--distribute takes mirrored or multiworker, got '{kind}'")
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=_cluster())


def _cluster() -> Any:
    """The cluster TF_CONFIG describes, checked: a UserError names what is wrong."""
    import json
    import os

    import tensorflow as tf

    text = os.environ.get("TF_CONFIG")
    example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    if not text:
        raise UserError(f"--distribute multiworker reads the cluster from TF_CONFIG, which is not set; {example}")
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"TF_CONFIG is not a cluster description ({type(e).__name__}: {e}); {example}") from None
    members = config["cluster"].get(kind) if isinstance(config["cluster"], dict) else None
    if not isinstance(workers, list) or not members or not 0 <= index < len(members):
        raise UserError(f"TF_CONFIG's task {kind} {index} is not in its cluster {config['cluster']}; {example}")
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def replicas(strategy: Any) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)
