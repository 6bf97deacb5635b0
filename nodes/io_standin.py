"""Stand-in for the part of ComfyUI's V3 node API (``comfy_api.latest.io``) the pack uses, for runs without ComfyUI
(tests, the CLI importing node helpers). Inside ComfyUI it is never imported: ``nodes/comfy_io.py`` takes the host's
own module.

It is kept honest two ways:

* it serialises a schema the way ComfyUI does (``Schema.get_v1_info``: ``/object_info``'s ``input``,
  ``input_order``, ``output``, ``output_name``...), and the integration test compares that, node by node, with what
  a real ComfyUI server publishes for the same declarations (tests/integration/test_comfyui_host.py);
* only the names and arguments the pack's declarations use exist here, so a declaration that uses anything else
  fails in the unit tests instead of silently meaning something different.

Behaviour that matters to the nodes is the host's: inputs arrive as keyword arguments of the ``execute``
classmethod, an unconnected optional input is not passed at all, ``cls.hidden`` holds the hidden values
(``unique_id``), and ``execute`` returns a ``NodeOutput`` whose ``result`` is the tuple of outputs.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, List, Optional


def _prune(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class NumberDisplay(str, enum.Enum):
    number = "number"
    slider = "slider"


class _Input:
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy

    def as_dict(self) -> Dict[str, Any]:
        return _prune({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                       "lazy": self.lazy})

    def get_io_type(self) -> str:
        return self.io_type


class _WidgetInput(_Input):
    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 lazy: bool = None, default: Any = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy)
        self.default = default
        self.force_input = force_input

    def as_dict(self) -> Dict[str, Any]:
        return super().as_dict() | _prune({"default": self.default, "forceInput": self.force_input})


class _Output:
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list: bool = False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    def as_dict(self) -> Dict[str, Any]:
        return _prune({"display_name": self.display_name, "tooltip": self.tooltip,
                       "is_output_list": self.is_output_list})


def _socket_type(io_type: str):
    """A socket-only ComfyType (IMAGE, MASK, custom types...): ``T.Input(id, ...)`` / ``T.Output(...)``."""

    class SocketType:
        pass

    class Input(_Input):
        pass

    class Output(_Output):
        pass

    SocketType.io_type = Input.io_type = Output.io_type = io_type
    SocketType.Input, SocketType.Output = Input, Output
    SocketType.__name__ = SocketType.__qualname__ = io_type
    return SocketType


Image = _socket_type("IMAGE")
Mask = _socket_type("MASK")
Latent = _socket_type("LATENT")
Conditioning = _socket_type("CONDITIONING")
Vae = _socket_type("VAE")

_CUSTOM_TYPES: Dict[str, type] = {}


def Custom(io_type: str):  # noqa: N802 - the host's spelling
    if io_type not in _CUSTOM_TYPES:
        _CUSTOM_TYPES[io_type] = _socket_type(io_type)
    return _CUSTOM_TYPES[io_type]


class Int:
    io_type = "INT"

    class Input(_WidgetInput):
        io_type = "INT"

        def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                     lazy: bool = None, default: int = None, min: int = None, max: int = None, step: int = None,
                     control_after_generate: bool = None, display_mode: NumberDisplay = None,
                     force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, force_input)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | _prune({
                "min": self.min, "max": self.max, "step": self.step,
                "control_after_generate": self.control_after_generate,
                "display": self.display_mode.value if self.display_mode else None,
            })


class Float:
    io_type = "FLOAT"

    class Input(_WidgetInput):
        io_type = "FLOAT"

        def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                     lazy: bool = None, default: float = None, min: float = None, max: float = None,
                     step: float = None, round: float = None, display_mode: NumberDisplay = None,
                     force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, force_input)
            self.min, self.max, self.step, self.round = min, max, step, round
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | _prune({
                "min": self.min, "max": self.max, "step": self.step, "round": self.round,
                "display": self.display_mode.value if self.display_mode else None,
            })


class Boolean:
    io_type = "BOOLEAN"

    class Input(_WidgetInput):
        io_type = "BOOLEAN"

        def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                     lazy: bool = None, default: bool = None, label_on: str = None, label_off: str = None,
                     force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, force_input)
            self.label_on, self.label_off = label_on, label_off

        def as_dict(self):
            return super().as_dict() | _prune({"label_on": self.label_on, "label_off": self.label_off})


class Combo:
    io_type = "COMBO"

    class Input(_WidgetInput):
        io_type = "COMBO"

        def __init__(self, id: str, options: List[str] = None, display_name: str = None, optional: bool = False,
                     tooltip: str = None, lazy: bool = None, default: str = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default)
            self.multiselect = False
            self.options = options

        def as_dict(self):
            return super().as_dict() | _prune({"multiselect": self.multiselect, "options": self.options})


class MultiType:
    class Input(_Input):
        """A socket that accepts several types (the host joins them with commas)."""

        def __init__(self, id: str, types: list, display_name: str = None, optional: bool = False,
                     tooltip: str = None, lazy: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy)
            self._io_types = types

        def get_io_type(self) -> str:
            return ",".join(dict.fromkeys(t.io_type for t in self._io_types))


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class HiddenHolder:
    def __init__(self, unique_id: Optional[str] = None):
        self.unique_id = unique_id

    def __getattr__(self, key: str):
        return None


@dataclasses.dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False

    def finalize(self) -> None:
        for i, output in enumerate(self.outputs or []):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"

    def validate(self) -> None:
        ids = [i.id for i in self.inputs or []] + [o.id for o in self.outputs or []]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.node_id}: input/output ids must be unique, got {ids}")

    def get_v1_info(self, cls=None) -> Dict[str, Any]:
        """What ``/object_info`` publishes for the node (the keys the host's ``NodeInfoV1`` has)."""
        inputs: Dict[str, Dict[str, tuple]] = {"required": {}}
        for i in self.inputs or []:
            opts = i.as_dict()
            opts.pop("optional", None)
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), opts)
        for hidden in self.hidden or []:
            inputs.setdefault("hidden", {})[hidden.name] = (hidden.value,)
        outputs = self.outputs or []
        return {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": [o.io_type for o in outputs],
            "output_is_list": [o.is_output_list for o in outputs],
            "output_name": [o.display_name or o.io_type for o in outputs],
            "output_tooltips": [o.tooltip or None for o in outputs],
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "output_node": self.is_output_node,
            "deprecated": self.is_deprecated,
            "experimental": self.is_experimental,
        }


class _ClassProperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


def _schema_value(read):
    return _ClassProperty(lambda cls: read(cls._schema()))


class ComfyNode:
    """Node base class: ``define_schema`` and ``execute`` are classmethods; the V1 attributes the host derives
    from the schema (``INPUT_TYPES``, ``RETURN_TYPES``...) are derived the same way here."""

    hidden: Optional[HiddenHolder] = None  # the host sets it on the per-run class clone

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> "NodeOutput":
        raise NotImplementedError

    @classmethod
    def _schema(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema

    @classmethod
    def INPUT_TYPES(cls, include_hidden: bool = True):  # noqa: N802 - the host's spelling
        inputs = cls._schema().get_v1_info(cls)["input"]
        if not include_hidden:
            inputs.pop("hidden", None)
        return inputs

    RETURN_TYPES = _schema_value(lambda s: [o.io_type for o in s.outputs or []])
    RETURN_NAMES = _schema_value(lambda s: [o.display_name or o.io_type for o in s.outputs or []])
    OUTPUT_TOOLTIPS = _schema_value(lambda s: [o.tooltip or None for o in s.outputs or []])
    CATEGORY = _schema_value(lambda s: s.category)
    DESCRIPTION = _schema_value(lambda s: s.description)
    DEPRECATED = _schema_value(lambda s: s.is_deprecated)
    OUTPUT_NODE = _schema_value(lambda s: s.is_output_node)


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None):
        self.args = args
        self.ui = ui

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self) -> list:
        raise NotImplementedError
