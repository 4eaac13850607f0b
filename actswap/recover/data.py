"""Training and check data for ``actswap recover``, in the forms a command line names.

* ``x.npz``: arrays ``x`` (inputs) and, optionally, ``y`` (labels or
  targets) or ``y_<output>`` (one per output of a multi-output model), read whole;
* a directory of images, one subfolder per class
  (``keras.utils.image_dataset_from_directory``: its labels, its class
  order), or a flat folder of images (inputs only);
* TFRecord files (a path or a glob ending in ``.tfrecord``/``.tfrecords``):
  ``tf.train.Example`` s holding an encoded image (PNG/JPEG) and, optionally,
  an integer label or a float target, under the feature names ``image`` and
  ``label`` (the TensorFlow Datasets convention) unless told otherwise;
* ``module:function``: a callable returning a ``tf.data.Dataset`` of
  ``(x, y)`` or ``x`` batches, for any other pipeline. It is the user's own
  code and runs as such.

Data without labels is read as inputs alone: the recovery then distils from
the original (:mod:`.run`).

Everything but ``.npz`` streams through ``tf.data`` (a shuffle buffer, then
prefetch): nothing loads the whole set into memory.

Invariants: :func:`check_spec` imports no TensorFlow and reads no image, so a
bad path or an empty folder fails fast (exit 2); a TFRecord without the
features named is refused before training, with the names it has (a label
named with ``--label-key`` must be there; the default ``label`` is used when
present); class order and labels are exactly ``image_dataset_from_directory`` 's.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
HOLD_OUT = 10  # without --val, every HOLD_OUT-th example (images: the last tenth) is check data


@dataclass
class DataOptions:
    """How images become model inputs; defaults come from the model's input."""

    image_size: tuple[int, int] | None = None  # None: the model's input height and width
    scale: float = 1.0  # multiplies pixel values (e.g. 1/255)
    image_key: str = "image"
    label_key: str | None = None  # None: "label" when the records have it, else no labels
    batch_size: int = 128
    shuffle_buffer: int = 10_000
    seed: int = 0


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"32,32"`` -> (32, 32); None stays None (the model's input size)."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--image-size must be H,W (e.g. 224,224), got '{text}'") from None
    if h < 1 or w < 1:
        raise UserError(f"--image-size must be positive, got '{text}'")
    return h, w


def parse_scale(text: str) -> float:
    """``"1/255"`` or ``"0.5"`` -> the factor pixel values are multiplied by."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--scale must be a number or a fraction such as 1/255, got '{text}'") from None
    return value


def kind(spec: str) -> str:
    """``"npz"``, ``"images"``, ``"tfrecord"`` or ``"callable"``; UserError (exit 2)
    for anything else. Looks only: no TensorFlow, no file opened."""
    if ":" in spec and not os.path.exists(spec) and "/" not in spec.split(":", 1)[0]:
        module, _, function = spec.partition(":")
        if module and function.isidentifier():
            return "callable"
    path = Path(spec)
    if path.is_dir():
        return "images"
    if spec.endswith(TFRECORD_SUFFIXES) or any(c in spec for c in "*?["):
        return "tfrecord"
    if path.suffix == ".npz" or path.is_file():
        return "npz"
    raise UserError(
        f"data '{spec}' is not an .npz file, a folder of class subfolders, TFRecord files or "
        "module:function; check the path"
    )


def check_spec(spec: str, what: str) -> str:
    """Validate ``spec`` without TensorFlow; return its kind."""
    found = kind(spec)
    if found == "images":
        classes = sorted(d for d in Path(spec).iterdir() if d.is_dir())
        images = [f for d in classes for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
        if not images and not _flat_images(spec):
            raise UserError(
                f"{what} folder '{spec}' holds no images, in class subfolders ({len(classes)} subfolder(s)) "
                f"or by themselves; put each class's {'/'.join(IMAGE_SUFFIXES)} files in a subfolder named "
                "after it, or the images alone in the folder (no labels)"
            )
    elif found == "tfrecord":
        if not tfrecord_files(spec):
            raise UserError(f"{what} '{spec}' matches no TFRecord file; check the path or glob")
    elif found == "npz" and not Path(spec).is_file():
        raise UserError(f"{what} '{spec}' is not a file; pass an .npz with arrays x and y")
    return found


@contextlib.contextmanager
def read_errors(*named: tuple[str, str]) -> Iterator[None]:
    """TensorFlow's errors from reading the data ``named`` ((what, spec) pairs),
    raised inside the block, as one UserError (exit 2) naming it: a corrupt or
    truncated TFRecord, an image its decoder refuses, a record without the
    named features. Only errors of the input pipeline are translated (a
    DataLossError, or an InvalidArgumentError raised while a dataset iterator
    produced the next element); any other error goes through unchanged."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        message = str(getattr(e, "message", e))
        if not isinstance(e, tf.errors.DataLossError) and not any(op in message for op in _PIPELINE_OPS):
            raise
        detail = _FUNCTION_NODE.sub("", message).strip().splitlines()
        which = " or ".join(f"{what} '{spec}'" for what, spec in named)
        raise UserError(
            f"{which} could not be read: {detail[0] if detail else type(e).__name__} "
            "(a corrupt image or record); remove or repair it"
        ) from None


# Where TensorFlow reports an error of the input pipeline: the iterator's
# next element, a dataset reduced or counted, a tf.data op inside a function.
_PIPELINE_OPS = ("IteratorGetNext", "ReduceDataset", "DatasetCardinality", "ParseExample", "DecodeImage", "decode_image")
_FUNCTION_NODE = re.compile(r"\{\{function_node [^}]*\}\}")


def load_xy(path: Any, what: str) -> tuple[Any, Any]:
    """(x, y) from an .npz: ``x`` (inputs) and, if it has labels or targets,
    ``y`` (a one-output model's) or ``y_<output>`` arrays (a dict by output
    name); y is None when it has neither."""
    from ..paths import read_arrays

    arrays = read_arrays(path, what)
    if "x" not in arrays:
        raise UserError(f"{what} '{path}' has arrays {sorted(arrays)}; it needs 'x' (inputs), and 'y' or "
                        "y_<output> arrays if it has labels")
    named = {k[2:]: v for k, v in arrays.items() if k.startswith("y_") and len(k) > 2}
    if "y" in arrays and named:
        raise UserError(f"{what} '{path}' has both 'y' and {sorted('y_' + k for k in named)}; keep one of them")
    y = arrays["y"] if "y" in arrays else (named or None)
    for name, a in ({"y": y} if "y" in arrays else {f"y_{k}": v for k, v in named.items()}).items():
        if len(a) != len(arrays["x"]):
            raise UserError(f"{what} '{path}': x has {len(arrays['x'])} rows but {name} has {len(a)}")
    return arrays["x"], y


def _flat_images(spec: str) -> list[Path]:
    return [f for f in Path(spec).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]


def labelled_folder(spec: str) -> bool:
    """A folder of class subfolders (labelled), not a flat folder of images."""
    return any(f.suffix.lower() in IMAGE_SUFFIXES for d in Path(spec).iterdir() if d.is_dir() for f in d.iterdir())


def tfrecord_files(spec: str) -> list[str]:
    return sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else ([spec] if os.path.isfile(spec) else [])


def input_geometry(model: Any) -> tuple[tuple[int, int] | None, int | None]:
    """((height, width), channels) of an image model's input, where it says."""
    shape = tuple(model.input_shape) if not isinstance(model.input_shape, list) else None
    if shape is None or len(shape) != 4:
        return None, None
    h, w, c = shape[1:]
    return ((int(h), int(w)) if h and w else None), (int(c) if c else None)


def open_data(
    spec: str, what: str, options: DataOptions, model: Any, *, split: str | None = None, shuffle: bool = True
) -> Any:
    """The data ``spec`` names: (x, y) arrays for an .npz, else a batched,
    prefetched ``tf.data.Dataset`` of (x, y). ``split``: None (all of it),
    ``"train"`` or ``"check"`` (the held-out part, when there is no --val).
    ``shuffle`` (training data) reshuffles every epoch; check data is never shuffled."""
    shuffle = shuffle and split != "check"
    found = check_spec(spec, what)
    if found == "npz":
        return load_xy(spec, what)
    import tensorflow as tf

    size, channels = input_geometry(model)
    size = options.image_size or size
    if found == "callable":
        if split is not None:
            raise UserError(f"pass --val with {what} '{spec}': actswap cannot hold out part of a pipeline it did not build")
        ds = _callable(spec, what)
    elif found == "images":
        ds = _images(spec, what, options, size, channels, split, shuffle)
    else:
        with read_errors((what, spec)):  # the records are counted here
            ds = _tfrecords(spec, what, options, size, channels, split, shuffle)
    return ds.prefetch(tf.data.AUTOTUNE)


def _callable(spec: str, what: str) -> Any:
    import importlib

    import tensorflow as tf

    module, _, function = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{what} '{spec}': cannot find {function} in module {module} ({e})") from None
    ds = fn()
    if not isinstance(ds, tf.data.Dataset):
        raise UserError(f"{what} '{spec}' returned {type(ds).__name__}; it must return a tf.data.Dataset of "
                        "(x, y) or x batches")
    return ds


def _images(
    spec: str, what: str, options: DataOptions, size: Any, channels: Any, split: str | None, shuffle: bool
) -> Any:
    import keras

    mode = {1: "grayscale", 3: "rgb", 4: "rgba"}.get(channels or 3, "rgb")
    labelled = labelled_folder(spec)
    kwargs: dict[str, Any] = dict(
        labels="inferred" if labelled else None, label_mode="int" if labelled else None,
        color_mode=mode, batch_size=options.batch_size,
        # With a split, both parts shuffle the file list with the same seed before
        # taking their share (Keras splits after its shuffle): disjoint, together whole.
        image_size=size or (256, 256), shuffle=shuffle or split is not None, seed=options.seed, verbose=False,
    )
    if split is not None:
        kwargs.update(validation_split=1 / HOLD_OUT, subset="training" if split == "train" else "validation")
    try:
        # It prints "Found N files..." on stdout, which --json keeps for JSON.
        with contextlib.redirect_stdout(io.StringIO()):
            ds = keras.utils.image_dataset_from_directory(spec, **kwargs)
    except ValueError as e:
        raise UserError(f"{what} folder '{spec}': {e}") from None
    scale = options.scale
    if scale == 1.0:
        return ds
    return ds.map(lambda x, y: (x * scale, y)) if labelled else ds.map(lambda x: x * scale)


def _tfrecords(
    spec: str, what: str, options: DataOptions, size: Any, channels: Any, split: str | None, shuffle: bool
) -> Any:
    import tensorflow as tf

    files = tfrecord_files(spec)
    label = _check_features(files[0], what, options)
    features = {options.image_key: tf.io.FixedLenFeature([], tf.string)}
    if label is not None:
        features[label[0]] = tf.io.FixedLenFeature([], tf.int64 if label[1] == "int64_list" else tf.float32)
    scale, c = options.scale, channels or 3

    def decode(record: Any) -> Any:
        ex = tf.io.parse_single_example(record, features)
        image = tf.io.decode_image(ex[options.image_key], channels=c, expand_animations=False)
        image = tf.cast(image, tf.float32)
        if size is not None:
            image = tf.image.resize(image, size)
        if label is None:
            return image * scale
        y = ex[label[0]]
        return image * scale, (tf.cast(y, tf.int32) if label[1] == "int64_list" else y)

    ds = tf.data.TFRecordDataset(files)
    if split is not None:  # every HOLD_OUT-th record, before any shuffling: a fixed split
        keep = (lambda i, r: i % HOLD_OUT == HOLD_OUT - 1) if split == "check" else (lambda i, r: i % HOLD_OUT != HOLD_OUT - 1)
        ds = ds.enumerate().filter(keep).map(lambda i, r: r)
    # TFRecords do not say how many records they hold; the blend schedule (in
    # epochs) needs the steps per epoch, so the records are counted once, undecoded.
    n = int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    if shuffle:
        ds = ds.shuffle(options.shuffle_buffer, seed=options.seed, reshuffle_each_iteration=True)
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(options.batch_size)


def _check_features(path: str, what: str, options: DataOptions) -> tuple[str, str] | None:
    """The first record must hold the named image (bytes) feature, and the
    label named with ``--label-key`` (an int64 label or a float target);
    without ``--label-key``, ``label`` is the label when present. Returns
    (label feature, its kind), or None: no labels."""
    import tensorflow as tf

    try:
        raw = next(iter(tf.data.TFRecordDataset([path]).take(1)))
    except StopIteration:
        raise UserError(f"{what} '{path}' holds no record") from None
    except tf.errors.OpError as e:
        raise UserError(f"{what} '{path}' is not a TFRecord file ({e.message.splitlines()[0]})") from None
    try:
        example = tf.train.Example.FromString(raw.numpy())
    except Exception:  # noqa: BLE001 - not an Example: said in one line
        raise UserError(f"{what} '{path}': its records are not tf.train.Example protobufs") from None
    have = example.features.feature

    def kind_of(name: str) -> str | None:
        return have[name].WhichOneof("kind") if name in have else None

    listed = ", ".join(sorted(have)) or "none"
    if kind_of(options.image_key) != "bytes_list":
        raise UserError(f"{what} '{path}': no bytes feature '{options.image_key}' in its examples "
                        f"(they have: {listed}); name it with --image-key")
    name = options.label_key or "label"
    if kind_of(name) in ("int64_list", "float_list"):
        return name, str(kind_of(name))
    if options.label_key is None and name not in have:
        return None
    raise UserError(f"{what} '{path}': no int64 or float feature '{name}' in its examples "
                    f"(they have: {listed}); name it with --label-key, or leave it out for no labels")
