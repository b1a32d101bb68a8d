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

A file must load back as the same network, so :func:`save` refuses (:class:`SaveError`,
naming the module) what a spec cannot describe: modules added to or removed from the base
model, changed classes that are not registered replacements, aliased modules or tied tensors
the base model does not share, and attributes that differ from the base model's without
being recorded structural attributes. Tensors keep their dtypes. On load the spec is
untrusted input: only the structural attributes each module kind declares are set, after
type and range checks; the base is built without pretrained weights (never touching the
network); and attributes must agree with the stored tensors' shapes. The header's shapes are
authoritative: the spec's ``shapes`` copy must agree with them for every tensor both list.

The package: ``spec`` (the format, and the parsing of a stored spec), ``sources`` (the base model
builders, :func:`create_base`), ``describe`` (what a spec says about a model, and what save
refuses), ``structure`` (checking and applying a spec's attributes and replacements),
``consistency`` (attributes against tensor shapes), ``saving`` (:func:`save`),
``loading`` (:func:`load`, :func:`read_spec`, :func:`load_state_into`), ``replacements``
(the init checks of prunekit's own replacement modules), ``errors`` and ``jsonable``.
Which attributes are structural (and their checks) and which classes may replace a base
model's modules is registered in :mod:`prunekit.nn.registry`, next to each class.
"""

from ..nn.registry import register_replacement, register_structural_attributes
from .describe import structural_attributes
from .errors import SaveError
from .loading import load, load_state_into, read_spec
from .saving import save
from .sources import SOURCES, create_base, module_package  # noqa: F401  (SOURCES: re-export)
from .spec import FORMAT, SAVED_SPEC_ATTR, SPEC_KEY  # noqa: F401  (re-export)

# Exporting lives in prunekit.export; these names stay importable from prunekit.io.
from ..export import ExportCheckError, export_onnx, export_torchscript  # noqa: F401  isort: skip
# Structural diff and restore steps, called directly by tests.
from .loading import _restore_structure  # noqa: F401  isort: skip
from .describe import _changed_modules  # noqa: F401  isort: skip

__all__ = [
    "FORMAT",
    "SaveError",
    "create_base",
    "module_package",
    "load",
    "load_state_into",
    "read_spec",
    "register_replacement",
    "register_structural_attributes",
    "save",
    "structural_attributes",
]
