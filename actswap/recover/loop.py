"""The training loop a recovery runs where Keras 3's ``fit`` cannot: under
``tf.distribute.MultiWorkerMirroredStrategy`` (keras-team/keras#20585:
``fit`` builds the model from a distributed batch, then fails to reduce its
metrics; both reproduced here with two local workers).

It is the part of ``fit`` a recovery uses, written with ``tf.distribute``'s
own custom-loop pieces: ``experimental_distribute_dataset`` (each global batch
of ``batch_size`` split across every replica of every worker),
``strategy.run`` of one step per replica, and gradients all-reduced (summed)
by the Keras optimizer, so each replica's loss is its share of the global
mean (``tf.nn.compute_average_loss``). The callbacks are the same objects
``fit`` would call (blend schedule, guard, checkpoints, TensorBoard, progress,
the user's), driven through ``keras.callbacks.CallbackList``.

Invariants: every worker takes the same decisions (the loss each callback
reads is the all-reduced one, so guard restores and learning-rate changes
happen everywhere alike), and only the chief writes files (checkpoints,
TensorBoard): callbacks that write are dropped on the other workers.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

SHUFFLE_SEED = 1234  # the same on every worker: each takes its share of one order


def needs_own_loop(strategy: Any) -> bool:
    """Whether ``fit`` cannot train under ``strategy`` (multi-worker)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy: Any) -> bool:
    """The worker that writes: ``chief`` if the cluster has one, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and int(resolver.task_id or 0) == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()


def _dataset(train: Any, batch_size: int) -> Any:
    if isinstance(train, tf.data.Dataset):
        return train  # batched (global batches) and shuffled by its own pipeline
    x, y = train
    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    ds = ds.shuffle(len(x), seed=SHUFFLE_SEED, reshuffle_each_iteration=True).batch(batch_size)
    options = tf.data.Options()
    # Arrays are not files: each worker keeps its replicas' part of every global batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _steps(ds: Any) -> int | None:
    n = int(ds.cardinality())
    return n if n >= 0 else None


def _accuracy(model: Any, val: Any, batch_size: int) -> float | None:
    """Top-1 accuracy of a classifier ``model``'s student on ``val`` (arrays or a
    Dataset of batches), on this worker alone: every worker holds the same
    weights. None without validation data or for a model that is not a
    labelled classifier (:class:`~.training.Distiller`'s ``classifies``)."""
    if val is None or not getattr(model, "classifies", False):
        return None
    student = model.student
    call = tf.function(lambda x: student(x, training=False))
    if isinstance(val, tf.data.Dataset):
        batches = ((xb, yb) for xb, yb in val)
    else:
        x, y = val
        batches = ((x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, len(x), batch_size))
    hits = n = 0
    for xb, yb in batches:
        pred = np.asarray(call(tf.convert_to_tensor(xb)))
        hits += int((pred.argmax(-1) == np.asarray(yb).reshape(-1)).sum())
        n += len(pred)
    return hits / n if n else None


def writes_files(callback: Any) -> bool:
    """Whether ``callback`` writes files: ours say so (``writes_files``), and Keras' own writers."""
    return bool(getattr(callback, "writes_files", False)) or isinstance(
        callback, (keras.callbacks.ModelCheckpoint, keras.callbacks.TensorBoard, keras.callbacks.CSVLogger,
                   keras.callbacks.BackupAndRestore))


def fit(model: Any, train: Any, val: Any, *, strategy: Any, epochs: int, initial_epoch: int,
        batch_size: int, callbacks: list[Any]) -> Any:
    """Train ``model`` (a compiled :class:`~.training.Distiller`) like
    ``model.fit`` would, under ``strategy``. Returns its
    ``keras.callbacks.History``, as ``fit`` does."""
    from .training import per_example_loss

    student = model.student
    optimizer = model.optimizer
    variables = student.trainable_variables
    with strategy.scope():
        optimizer.build(variables)
    ds = _dataset(train, batch_size)
    steps = _steps(ds)
    chief = is_chief(strategy)
    kept = [c for c in callbacks if chief or not writes_files(c)]
    history = keras.callbacks.History()
    cbs = keras.callbacks.CallbackList([*kept, history], model=model, epochs=epochs, steps=steps, verbose=0)

    def replica_step(x: Any, y: Any = None) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(per_example_loss(model, x, y), global_batch_size=batch_size)
            if student.losses:  # e.g. Blend range penalties, once per replica
                loss += tf.nn.scale_regularization_loss(tf.add_n(student.losses))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    @tf.function
    def step(batch: Any) -> Any:
        x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
        losses = strategy.run(replica_step, args=(x,) if y is None else (x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    model.stop_training = False
    cbs.on_train_begin()
    dist = strategy.experimental_distribute_dataset(ds)
    for epoch in range(initial_epoch, epochs):
        cbs.on_epoch_begin(epoch)
        total, count, count_all = 0.0, 0, 0
        for i, batch in enumerate(dist):
            cbs.on_train_batch_begin(i)
            loss = float(step(batch))
            # Each batch's own loss, not fit's running mean: a NaN batch the guard
            # undoes must not stay in the mean (fit's is reset by the guard).
            cbs.on_train_batch_end(i, {"loss": loss})
            count_all += 1
            total, count = (total + loss, count + 1) if np.isfinite(loss) else (0.0, 0)
            if model.stop_training:
                break
        logs: dict[str, Any] = {"loss": total / max(count, 1)}
        acc = _accuracy(model, val, batch_size)
        if acc is not None:
            logs["val_accuracy"] = acc
        cbs.on_epoch_end(epoch, logs)
        if steps is None and not model.stop_training:  # a pipeline of unknown length: now it is known
            steps = count_all
            cbs.set_params({**cbs.params, "steps": steps})
        if model.stop_training:
            break
    cbs.on_train_end()
    return history
