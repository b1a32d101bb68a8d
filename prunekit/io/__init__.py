"""Saving, loading and exporting (pruned) models.

A pruned model is stored as ONE ``.safetensors`` file: its state dict, plus a JSON *spec* in
the safetensors header metadata (key ``"prunekit_spec"``) that says how to rebuild the
architecture. No Python object is pickled, so loading a file can never execute code.

Pruning keeps every module class but shrinks tensors and changes a few integer attributes, so
the spec records (1) the *base* model the network started from (``create`` name + kwargs, or a
torchvision builder), (2) the shape of every tensor, and (3) the structural attributes
(``out_channels``, ``groups``, ZeroPadShortcut's ``positions``, ...) of every module whose
attributes differ from a freshly built base. Loading builds the base, swaps in empty tensors of
the saved shapes, restores those attributes and then loads the weights strictly::

    {"format": "prunekit/1",
     "base": {"source": "prunekit", "name": "cifar_resnet56", "kwargs": {"num_classes": 10, ...}},
     "shapes": {"conv1.weight": [8, 3, 3, 3], ...},
     "modules": {"conv1": {"in_channels": 3, "out_channels": 8, "groups": 1}, ...},
     "method": ..., "recipe": ..., "plan": ..., "metrics": ...,
     "prunekit_version": "0.1.0", "torch_version": "2.14.1"}

>>> import torch, prunekit, prunekit.io
>>> model = prunekit.models.create("cifar_resnet56")
>>> result = prunekit.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
>>> prunekit.io.save(model, "resnet56-pruned.safetensors", method="l1", plan=result.plan)
>>> same = prunekit.io.load("resnet56-pruned.safetensors").eval()

The package: ``spec`` (the format, and the parsing of a stored spec), ``sources`` (the base model
builders, :func:`create_base`), ``saving`` (:func:`save`, the structural diff),
``loading`` (:func:`load`, :func:`read_spec`, :func:`load_state_into`) and ``jsonable``.
Which attributes are structural and which classes may replace a base model's modules is
registered in :mod:`prunekit.nn.registry`, next to each class.
"""

from ..nn.registry import register_replacement, register_structural_attributes
from .loading import load, load_state_into, read_spec
from .saving import save, structural_attributes
from .sources import SOURCES, create_base  # noqa: F401  (SOURCES: re-export)
from .spec import FORMAT, SAVED_SPEC_ATTR, SPEC_KEY  # noqa: F401  (re-export)

# Exporting lives in prunekit.export; these names stay importable from prunekit.io.
from ..export import ExportCheckError, export_onnx, export_torchscript  # noqa: F401  isort: skip
# Structural diff and restore steps, called directly by tests.
from .loading import _restore_structure  # noqa: F401  isort: skip
from .saving import _changed_modules  # noqa: F401  isort: skip

__all__ = [
    "FORMAT",
    "create_base",
    "load",
    "load_state_into",
    "read_spec",
    "register_replacement",
    "register_structural_attributes",
    "save",
    "structural_attributes",
]
