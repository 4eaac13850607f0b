"""The few fields of TensorFlow's protobufs that the scan reads, without TensorFlow.

``tensorflow.core.protobuf.saved_model_pb2`` lives inside the ``tensorflow``
package, and importing it runs ``tensorflow/__init__`` (the whole of
TensorFlow, seconds). The scan must read a SavedModel *before* TensorFlow
loads it, and ``actswap scan`` should stay quick, so this module declares the
subset it needs (op names, function calls, the saver, signatures, the object
graph's function names and assets, Keras 2 metadata) with the same field numbers and wire
types, and lets the ``protobuf`` runtime parse the real files: fields not
declared here are skipped. ``tests/test_scan.py`` checks every declared field
against TensorFlow's own descriptors.

Invariant: importing this module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
STRING, MESSAGE, INT32, INT64, ENUM_AS_INT = _F.TYPE_STRING, _F.TYPE_MESSAGE, _F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_INT32
OPTIONAL, REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

PACKAGE = "actswap_scan"

# message -> [(field, number, type, label, message type or None)]; numbers as in
# tensorflow/core/{framework,protobuf}/*.proto and tf_keras/protobuf/saved_metadata.proto.
# Maps are declared as their wire form: repeated {key = 1; value = 2} entries.
# Enums (DataType) are read as int32, which has the same wire encoding.
SCHEMA: dict[str, list[tuple[str, int, int, int, str | None]]] = {
    "SavedModel": [
        ("saved_model_schema_version", 1, INT64, OPTIONAL, None),
        ("meta_graphs", 2, MESSAGE, REPEATED, "MetaGraphDef"),
    ],
    "MetaGraphDef": [
        ("meta_info_def", 1, MESSAGE, OPTIONAL, "MetaInfoDef"),
        ("graph_def", 2, MESSAGE, OPTIONAL, "GraphDef"),
        ("saver_def", 3, MESSAGE, OPTIONAL, "SaverDef"),
        ("collection_def", 4, MESSAGE, REPEATED, "CollectionDefEntry"),
        ("signature_def", 5, MESSAGE, REPEATED, "SignatureDefEntry"),
        ("asset_file_def", 6, MESSAGE, REPEATED, "AssetFileDef"),
        ("object_graph_def", 7, MESSAGE, OPTIONAL, "SavedObjectGraph"),
    ],
    "AssetFileDef": [
        ("tensor_info", 1, MESSAGE, OPTIONAL, "TensorInfo"),
        ("filename", 2, STRING, OPTIONAL, None),
    ],
    "MetaInfoDef": [("tags", 4, STRING, REPEATED, None)],
    "GraphDef": [
        ("node", 1, MESSAGE, REPEATED, "NodeDef"),
        ("library", 2, MESSAGE, OPTIONAL, "FunctionDefLibrary"),
    ],
    "NodeDef": [
        ("name", 1, STRING, OPTIONAL, None),
        ("op", 2, STRING, OPTIONAL, None),
        ("input", 3, STRING, REPEATED, None),
        ("attr", 5, MESSAGE, REPEATED, "AttrEntry"),
    ],
    "AttrEntry": [("key", 1, STRING, OPTIONAL, None), ("value", 2, MESSAGE, OPTIONAL, "AttrValue")],
    "AttrValue": [
        ("list", 1, MESSAGE, OPTIONAL, "ListValue"),
        ("type", 6, ENUM_AS_INT, OPTIONAL, None),
        ("func", 10, MESSAGE, OPTIONAL, "NameAttrList"),
    ],
    "ListValue": [
        ("type", 6, ENUM_AS_INT, REPEATED, None),
        ("func", 9, MESSAGE, REPEATED, "NameAttrList"),
    ],
    "NameAttrList": [("name", 1, STRING, OPTIONAL, None), ("attr", 2, MESSAGE, REPEATED, "AttrEntry")],
    "FunctionDefLibrary": [
        ("function", 1, MESSAGE, REPEATED, "FunctionDef"),
        ("gradient", 2, MESSAGE, REPEATED, "GradientDef"),
        ("registered_gradients", 3, MESSAGE, REPEATED, "RegisteredGradient"),
    ],
    "FunctionDef": [
        ("signature", 1, MESSAGE, OPTIONAL, "OpDef"),
        ("node_def", 3, MESSAGE, REPEATED, "NodeDef"),
    ],
    "OpDef": [("name", 1, STRING, OPTIONAL, None), ("input_arg", 2, MESSAGE, REPEATED, "ArgDef")],
    "ArgDef": [("name", 1, STRING, OPTIONAL, None)],
    "GradientDef": [("function_name", 1, STRING, OPTIONAL, None), ("gradient_func", 2, STRING, OPTIONAL, None)],
    "RegisteredGradient": [
        ("gradient_func", 1, STRING, OPTIONAL, None),
        ("registered_op_type", 2, STRING, OPTIONAL, None),
    ],
    "SaverDef": [
        ("filename_tensor_name", 1, STRING, OPTIONAL, None),
        ("save_tensor_name", 2, STRING, OPTIONAL, None),
        ("restore_op_name", 3, STRING, OPTIONAL, None),
    ],
    "CollectionDefEntry": [("key", 1, STRING, OPTIONAL, None), ("value", 2, MESSAGE, OPTIONAL, "CollectionDef")],
    "CollectionDef": [("node_list", 1, MESSAGE, OPTIONAL, "NodeList")],
    "NodeList": [("value", 1, STRING, REPEATED, None)],
    "SignatureDefEntry": [("key", 1, STRING, OPTIONAL, None), ("value", 2, MESSAGE, OPTIONAL, "SignatureDef")],
    "SignatureDef": [
        ("inputs", 1, MESSAGE, REPEATED, "TensorInfoEntry"),
        ("outputs", 2, MESSAGE, REPEATED, "TensorInfoEntry"),
        ("method_name", 3, STRING, OPTIONAL, None),
    ],
    "TensorInfoEntry": [("key", 1, STRING, OPTIONAL, None), ("value", 2, MESSAGE, OPTIONAL, "TensorInfo")],
    "TensorInfo": [("name", 1, STRING, OPTIONAL, None), ("dtype", 2, ENUM_AS_INT, OPTIONAL, None)],
    "SavedObjectGraph": [
        ("nodes", 1, MESSAGE, REPEATED, "SavedObject"),
        ("concrete_functions", 2, MESSAGE, REPEATED, "ConcreteFunctionEntry"),
    ],
    "SavedObject": [("asset", 5, MESSAGE, OPTIONAL, "SavedAsset")],
    "SavedAsset": [("asset_file_def_index", 1, INT32, OPTIONAL, None)],
    "ConcreteFunctionEntry": [
        ("key", 1, STRING, OPTIONAL, None),
        ("value", 2, MESSAGE, OPTIONAL, "SavedConcreteFunction"),
    ],
    "SavedConcreteFunction": [("bound_inputs", 2, INT32, REPEATED, None)],
    # tf_keras/protobuf/saved_metadata.proto
    "SavedMetadata": [("nodes", 1, MESSAGE, REPEATED, "SavedMetadataObject")],
    "SavedMetadataObject": [
        ("node_id", 2, INT32, OPTIONAL, None),
        ("node_path", 3, STRING, OPTIONAL, None),
        ("identifier", 4, STRING, OPTIONAL, None),
        ("metadata", 5, STRING, OPTIONAL, None),
    ],
}

# Where each declared message lives in TensorFlow / tf_keras (for the schema test).
TF_NAMES = {
    "SavedModel": "tensorflow.SavedModel",
    "MetaGraphDef": "tensorflow.MetaGraphDef",
    "MetaInfoDef": "tensorflow.MetaGraphDef.MetaInfoDef",
    "GraphDef": "tensorflow.GraphDef",
    "NodeDef": "tensorflow.NodeDef",
    "AttrEntry": "tensorflow.NodeDef.AttrEntry",
    "AttrValue": "tensorflow.AttrValue",
    "ListValue": "tensorflow.AttrValue.ListValue",
    "NameAttrList": "tensorflow.NameAttrList",
    "FunctionDefLibrary": "tensorflow.FunctionDefLibrary",
    "FunctionDef": "tensorflow.FunctionDef",
    "OpDef": "tensorflow.OpDef",
    "ArgDef": "tensorflow.OpDef.ArgDef",
    "GradientDef": "tensorflow.GradientDef",
    "RegisteredGradient": "tensorflow.RegisteredGradient",
    "SaverDef": "tensorflow.SaverDef",
    "CollectionDefEntry": "tensorflow.MetaGraphDef.CollectionDefEntry",
    "CollectionDef": "tensorflow.CollectionDef",
    "NodeList": "tensorflow.CollectionDef.NodeList",
    "SignatureDefEntry": "tensorflow.MetaGraphDef.SignatureDefEntry",
    "SignatureDef": "tensorflow.SignatureDef",
    "TensorInfoEntry": "tensorflow.SignatureDef.InputsEntry",
    "TensorInfo": "tensorflow.TensorInfo",
    "SavedObjectGraph": "tensorflow.SavedObjectGraph",
    "AssetFileDef": "tensorflow.AssetFileDef",
    "SavedObject": "tensorflow.SavedObject",
    "SavedAsset": "tensorflow.SavedAsset",
    "SavedConcreteFunction": "tensorflow.SavedConcreteFunction",
    "ConcreteFunctionEntry": "tensorflow.SavedObjectGraph.ConcreteFunctionsEntry",
    "SavedMetadata": "third_party.py.tf_keras.protobuf.SavedMetadata",
    "SavedMetadataObject": "third_party.py.tf_keras.protobuf.SavedObject",
}

# tensorflow/core/framework/types.proto
DT_HALF, DT_BFLOAT16 = 19, 14

_classes: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    fd = descriptor_pb2.FileDescriptorProto(name="actswap_scan.proto", package=PACKAGE, syntax="proto3")
    for name, fields in SCHEMA.items():
        msg = fd.message_type.add(name=name)
        for fname, number, ftype, label, mtype in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if mtype is not None:
                field.type_name = f".{PACKAGE}.{mtype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in SCHEMA
    }


def message(name: str) -> Any:
    """A new, empty message of the declared type ``name`` (e.g. ``"SavedModel"``)."""
    if not _classes:
        _classes.update(_build())
    return _classes[name]()
