"""The MLflow pyfunc model as users consume it: image files in, labels and probabilities out.

In: a pandas DataFrame with a column ``image`` whose cells are the raw bytes of image files
(PNG, JPEG, anything :func:`pipelines.images.decode_image` reads), base64 strings of such
bytes, or already-decoded ``HxW`` / ``HxWxC`` arrays. Out: one row per input row, in input
order, with the columns of :data:`OUTPUT_COLUMNS`::

    predicted_label  string          label name of the most probable class
    probability      double          that class's probability (pandas ``Float64``: nullable)
    probabilities    array<double>   one probability per class, in ``label_names`` order
    error            string          null, or why this row's image could not be used

A row whose image cannot be decoded is neither dropped nor fatal: it gets ``error`` set and
a null label, probability and probabilities, and the other rows are scored as usual.
What the columns hold is the model's task's (:mod:`pipelines.tasks`): a reconstruction model
(the autoencoder) has no labels, so ``predicted_label`` and ``probability`` are null, and the
extra column ``reconstruction_error`` (``Float64``) holds each image's mean absolute error.
Unknown numbers are ``pd.NA`` in nullable ``Float64`` columns, not NaN: MLflow's scoring
server writes them as JSON ``null`` (NaN is not JSON, and strict parsers reject the whole
response), and Spark stores them as null.

Every image goes through :func:`~pipelines.images.decode_image` or
:func:`~pipelines.images.prepare_array` and then :func:`~pipelines.images.normalise`, the
functions ingest uses, so the model sees the same pixels in serving as in training.

The logged model carries this package (``code_paths``), a Keras ``.h5`` file saved without
its optimizer (a Horovod-wrapped optimizer cannot be deserialised without Horovod) and a
``labels.json``. It scores through ``mlflow.pyfunc.load_model``,
``mlflow.pyfunc.spark_udf(..., env_manager="local")`` and ``mlflow models serve``, whose JSON
carries a binary column as base64 (``{"dataframe_split": {"columns": ["image"], "data":
[["<base64>"]]}}``). TensorFlow is imported only when a model is saved or loaded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.resources
import json
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from pipelines import schema
from pipelines.images import ImageDecodeError, decode_image, normalise, prepare_array
from pipelines.keras_api import keras
from pipelines.stack import KERAS, STACK_TAG, check_model_stack, current
from pipelines.store import ModelDir
from pipelines.tasks import CLASSIFICATION, Task, task_of_record

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from pipelines.keras_api import KerasModel

#: The input column of the pyfunc model.
IMAGE_COLUMN = "image"

#: Output columns of a classifier, in order (the contract is :data:`schema.MODEL_OUTPUTS`).
OUTPUT_COLUMNS: tuple[str, ...] = tuple(schema.MODEL_OUTPUTS)

#: Artifact keys of the logged model.
KERAS_ARTIFACT = "keras_model"
LABELS_ARTIFACT = "labels"

#: Images per ``model.predict`` batch (bounds memory for large Spark Arrow batches).
PREDICT_BATCH_SIZE = 256

#: Distributions the logged model needs, pinned to the versions installed here. TensorFlow
#: brings h5py (the .h5 reader); protobuf is pinned because MLflow alone would pull a 5.x+ that
#: TensorFlow 2.15 cannot import; cloudpickle unpickles the model class.
_REQUIRED_DISTRIBUTIONS: tuple[str, ...] = (
    "mlflow",
    "tensorflow-cpu",
    "numpy",
    "pandas",
    "pillow",
    "protobuf",
    "cloudpickle",
)
#: The same on the Keras stack: Keras 3 on JAX (h5py reads the .h5 file), no TensorFlow.
_REQUIRED_DISTRIBUTIONS_KERAS: tuple[str, ...] = (
    "mlflow",
    "keras",
    "jax",
    "jaxlib",
    "h5py",
    "numpy",
    "pandas",
    "pillow",
    "cloudpickle",
)

# A data URL prefix such as "data:image/png;base64," that browsers put in front of base64.
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


class ImageModel(mlflow.pyfunc.PythonModel):
    """Pyfunc model: raw image bytes (or base64, or arrays) in, label and probabilities out.

    Artifacts: ``keras_model``, an ``.h5`` file, and ``labels``, a JSON file with
    ``label_names``, ``image_shape`` (``[height, width, channels]``) and ``task``.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the Keras model and the label metadata (once per Python process).

        Args:
            context: MLflow's context; its ``artifacts`` maps artifact keys to local paths.

        """
        meta = json.loads(Path(context.artifacts[LABELS_ARTIFACT]).read_text())
        self.label_names: list[str] = [str(name) for name in meta["label_names"]]
        height, width, channels = (int(d) for d in meta["image_shape"])
        self.image_shape: tuple[int, int, int] = (height, width, channels)
        self.task: Task = task_of_record(meta)
        # Before any Keras: a model of the other stack's Keras would load wrongly, or not.
        check_model_stack(meta.get(STACK_TAG), "this model")
        self.model = keras().models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        self._forward = _compiled_forward(self.model)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Score every row of ``model_input``; a row that cannot be decoded gets ``error``.

        Args:
            context: MLflow's context (unused; everything was loaded in ``load_context``).
            model_input: DataFrame with an ``image`` column (a lone column of another name is
                taken as the image column, as Spark may pass it unnamed).
            params: Unused.

        Returns:
            One row per input row, same index, the task's output columns.

        Raises:
            ValueError: ``model_input`` has no ``image`` column.

        """
        images = _image_column(model_input)
        size, _, channels = self.image_shape
        pixels: list[np.ndarray] = []
        good: list[int] = []
        errors: list[str | None] = [None] * len(images)
        for position, value in enumerate(images):
            try:
                pixels.append(to_pixels(value, size, channels))
                good.append(position)
            except ImageDecodeError as exc:
                errors[position] = str(exc)

        rows = len(images)
        columns: dict[str, Any] = {name: [None] * rows for name in self.task.output_columns}
        columns["error"] = errors
        if good:
            batch = normalise(np.stack(pixels))
            values = self.task.output_values(self._predict(batch), batch, self.label_names)
            for name, column in values.items():
                for position, value in zip(good, column, strict=True):
                    columns[name][position] = value
        result = pd.DataFrame(
            {
                name: _column(values, self.task.output_columns[name])
                for name, values in columns.items()
            }
        )
        result.index = images.index
        return result

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the Keras model over a float32 batch, in chunks of PREDICT_BATCH_SIZE."""
        chunks = [
            np.asarray(self._forward(batch[start : start + PREDICT_BATCH_SIZE]))
            for start in range(0, len(batch), PREDICT_BATCH_SIZE)
        ]
        return np.concatenate(chunks)


def _column(values: list[Any], kind: str) -> Any:
    """One output column: doubles as nullable ``Float64`` (JSON ``null``, never NaN)."""
    if kind == "double":
        return pd.array([pd.NA if v is None else v for v in values], dtype="Float64")
    return pd.Series(values, dtype=object)


def _compiled_forward(model: KerasModel) -> Any:
    """The model's inference pass as one TensorFlow graph, traced once for any batch size.

    Measured on 28x28 digits, one CPU thread: 1.3x the images/s of calling the model
    eagerly and 1.7x of ``model.predict`` on batches of 256 (the graph lets TensorFlow fuse
    convolution, bias and activation; ``predict`` also builds a dataset per call).
    """
    from pipelines.keras_api import is_keras3

    if is_keras3():
        # JAX: Keras 3 compiles the layers' ops itself; no TensorFlow graph to trace.
        return lambda images: model(images, training=False)
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    return tf.function(lambda images: model(images, training=False), input_signature=[spec])


def to_pixels(value: Any, size: int, channels: int) -> np.ndarray:
    """Turn one cell of the ``image`` column into uint8 pixels, as ingest does.

    Args:
        value: Image file bytes (``bytes``, ``bytearray``, ``memoryview``), a base64 string of
            such bytes (optionally a ``data:...;base64,`` URL), or decoded pixels (a numpy
            array or nested lists, ``HxW`` or ``HxWxC``).
        size: Side of the square model input.
        channels: 1 (grey) or 3 (RGB).

    Returns:
        uint8 array of shape ``(size, size, channels)``.

    Raises:
        ImageDecodeError: The value is missing, not base64, not a decodable image, or of a
            type that holds no image; the message is one line.

    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ImageDecodeError("missing image: the image value is null")
    if isinstance(value, bytes | bytearray | memoryview):
        return decode_image(bytes(value), size, channels)
    if isinstance(value, str):
        return decode_image(_from_base64(value), size, channels)
    if isinstance(value, np.ndarray | list | tuple):
        try:
            array = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise ImageDecodeError(f"unsupported array: {exc}") from exc
        if array.dtype == object:
            raise ImageDecodeError("unsupported array: expected numbers, got objects")
        return prepare_array(array, size, channels)
    raise ImageDecodeError(
        f"unsupported image value of type {type(value).__name__}: "
        "expected image file bytes, a base64 string or a pixel array"
    )


def _from_base64(text: str) -> bytes:
    """Decode a base64 string (MIME line breaks and a data URL prefix allowed)."""
    payload = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"not base64: {exc}") from exc


def _image_column(model_input: Any) -> pd.Series:
    """Return the image column of a pyfunc input (DataFrame, dict of lists, list of values)."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if IMAGE_COLUMN in frame.columns:
        return frame[IMAGE_COLUMN]
    if len(frame.columns) == 1:
        return frame.iloc[:, 0]
    raise ValueError(
        f"model input needs a column named {IMAGE_COLUMN!r} holding image bytes, "
        f"got columns {list(frame.columns)}"
    )


def save_keras_artifacts(
    model: KerasModel,
    label_names: Sequence[str],
    image_shape: Sequence[int],
    task: Task,
    directory: str | Path,
) -> dict[str, str]:
    """Write the artifacts of :class:`ImageModel`: the Keras model and its labels.

    Args:
        model: The trained Keras model; its optimizer is not saved (a Horovod-wrapped
            optimizer cannot be deserialised without Horovod, and scoring needs none).
        label_names: Class names in the order of the model's output units (unused, but
            still recorded, by a task that learns no labels).
        image_shape: ``(height, width, channels)`` of the model input; height equals width
            and channels is 1 or 3, as ingest produces.
        task: What the model does.
        directory: Existing directory to write ``model.h5`` and ``labels.json`` into.

    Returns:
        The ``artifacts`` mapping for ``mlflow.pyfunc.log_model``.

    Raises:
        ValueError: The shape is not square grey/RGB, or a classifier's number of output
            units differs from the number of labels.

    """
    shape = [int(d) for d in image_shape]
    if len(shape) != 3 or shape[0] != shape[1] or shape[0] < 1 or shape[2] not in (1, 3):
        raise ValueError(f"image_shape must be (size, size, 1 or 3), got {tuple(image_shape)!r}")
    names = [str(name) for name in label_names]
    if task.uses_labels:
        units = int(model.output_shape[-1])
        if units != len(names):
            raise ValueError(
                f"the model has {units} output classes but {len(names)} label names were given"
            )
    root = Path(directory)
    model_path = root / ModelDir.KERAS_FILE
    labels_path = root / ModelDir.LABELS_FILE
    with warnings.catch_warnings():
        # Keras calls HDF5 "legacy"; it is the one format that loads without custom objects.
        warnings.filterwarnings("ignore", message=".*HDF5 file.*", category=UserWarning)
        model.save(model_path, include_optimizer=False, save_format="h5")
    meta = {"label_names": names, "image_shape": shape, "task": task.name, STACK_TAG: current()}
    labels_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {KERAS_ARTIFACT: str(model_path), LABELS_ARTIFACT: str(labels_path)}


def model_signature(num_classes: int, task: Task = CLASSIFICATION) -> ModelSignature:
    """Return the signature of :class:`ImageModel`, derived from the task's output columns.

    Input: ``image`` binary (base64 in JSON requests). Output: the task's columns
    (:attr:`~pipelines.tasks.Task.output_columns`): for a classifier ``predicted_label``
    string, ``probability`` double, ``probabilities`` array of ``num_classes`` doubles (MLflow
    schemas carry no array length), ``error`` string; a reconstruction adds
    ``reconstruction_error`` double. Every output may be null (a row whose image cannot be
    used, or a reconstruction's probability) and is marked optional.

    Args:
        num_classes: Number of classes (at least 2 for a classifier).
        task: What the model does.

    Returns:
        The signature; ``mlflow.pyfunc.spark_udf`` derives its struct result type from it.

    Raises:
        ValueError: A classifier with fewer than 2 classes.

    """
    if task.uses_labels and num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    kinds = {"string": DataType.string, "double": DataType.double}
    kinds["array<double>"] = Array(DataType.double)
    outputs = [
        ColSpec(kinds[kind], name, required=False) for name, kind in task.output_columns.items()
    ]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]), outputs=Schema(outputs)
    )


def pip_requirements() -> list[str]:
    """Return the pinned requirements of the logged model (installed versions, ``==``)."""
    pins = []
    keras_stack = current() == KERAS
    for dist in _REQUIRED_DISTRIBUTIONS_KERAS if keras_stack else _REQUIRED_DISTRIBUTIONS:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def log_image_model(
    model: KerasModel,
    *,
    label_names: Sequence[str],
    image_shape: Sequence[int],
    task: Task,
    input_example_png: bytes,
    name: str = "model",
) -> ModelInfo:
    """Log ``model`` as an :class:`ImageModel` pyfunc in the active MLflow run.

    The logged model carries this package as code, so it loads wherever its pinned
    requirements (:func:`pip_requirements`) are installed, without ``pipelines`` installed.

    Args:
        model: The trained Keras model.
        label_names: Class names in output order.
        image_shape: ``(height, width, channels)`` of the model input.
        task: What the model does.
        input_example_png: One image file, stored as the model's input example.
        name: Name of the logged model within the run.

    Returns:
        MLflow's ModelInfo; ``model_uri`` is what to register.

    Raises:
        RuntimeError: No MLflow run is active (the model would belong to no run, and
            promotion reads the run's metrics).

    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_image_model must be called inside an active MLflow run")
    num_classes = len(label_names)
    with tempfile.TemporaryDirectory(prefix="dlpipe-model-") as tmp:
        root = Path(tmp)
        (root / ModelDir.ARTIFACTS_DIR).mkdir()
        artifacts = save_keras_artifacts(
            model, label_names, image_shape, task, root / ModelDir.ARTIFACTS_DIR
        )
        code_copy = root / "code" / __package__
        _copy_package(importlib.resources.files(__package__), code_copy)
        with _quiet_cloudpickle_notice():
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=ImageModel(),
                artifacts=artifacts,
                signature=model_signature(num_classes, task),
                input_example=pd.DataFrame({IMAGE_COLUMN: [input_example_png]}),
                code_paths=[str(code_copy)],
                pip_requirements=pip_requirements(),
            )


def _copy_package(source: Traversable, target: Path) -> None:
    """Copy the package's files (no bytecode), from a folder or from a zip on the path.

    On a cluster the driver may import the project from the archive spark-submit shipped
    (``--py-files``), where there is no folder to ``copytree``.
    """
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name == "__pycache__" or entry.name.endswith(".pyc"):
            continue
        if entry.is_dir():
            _copy_package(entry, target / entry.name)
        else:
            (target / entry.name).write_bytes(entry.read_bytes())


class _DropMessage(logging.Filter):
    """Logging filter that drops records whose message contains a fixed text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_cloudpickle_notice() -> Iterator[None]:
    """Drop MLflow's advice to log models from code instead of pickling them.

    The pickle is a reference to :class:`ImageModel`, whose code travels with the model
    (``code_paths``), so the notice is noise in every training log.
    """
    logger = logging.getLogger("mlflow.pyfunc")
    notice = _DropMessage("serialized using CloudPickle")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
