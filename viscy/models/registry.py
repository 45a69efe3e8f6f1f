"""Model registry: model name -> constructor, plus the input constraint every model declares.

A model name is a built-in architecture (``unet2d``, ...), a constructor registered in this process
(:func:`register_model`), an entry point of group ``viscy.models`` of an installed package, or an import path
``package.module:Class`` (or ``package.module:function``). Every process that builds a model (the driver, Ray
Train workers, predict actors, export) resolves the name itself, by import, so a network of one's own needs
only to be importable there. A model declares its :class:`ModelSpec` as ``model.spec``, or viscy derives it
(:func:`derive_spec`).

This module does not import torch at import time; constructors are resolved lazily so that config validation
can check names cheaply.
"""

from __future__ import annotations

import importlib
import inspect
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from viscy.errors import ModelError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint


@dataclass(frozen=True)
class ModelSpec:
    """What a model accepts and returns; tiling, serving and export read this instead of guessing.

    Input is ``(B, in_channels, z_window_size, Y, X)`` with Y and X multiples of ``yx_multiple``; output is
    ``(B, out_channels, out_depth, Y, X)``.
    """

    architecture: str
    in_channels: int
    out_channels: int
    z_window_size: int
    out_depth: int
    yx_multiple: int

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`~viscy.errors.ModelError` unless ``shape`` is a valid input shape."""
        if len(shape) != 5:
            raise ModelError(f"{self.architecture}: expected (B, C, Z, Y, X) input, got shape {tuple(shape)}")
        _, c, z, y, x = shape
        problems = []
        if c != self.in_channels:
            problems.append(f"{c} channels (expected {self.in_channels})")
        if z != self.z_window_size:
            problems.append(f"Z depth {z} (expected {self.z_window_size})")
        if y % self.yx_multiple or x % self.yx_multiple:
            problems.append(f"YX {y}x{x} (must be multiples of {self.yx_multiple}; pad first)")
        if problems:
            raise ModelError(f"{self.architecture}: invalid input {tuple(shape)}: " + ", ".join(problems))

    def check_data(
        self,
        source_channels: Sequence[str],
        target_channels: Sequence[str],
        z_window_size: int,
        target_depth: int,
        yx_patch_size: Sequence[int],
        target_key: str = "data.target_channels",
    ) -> list[str]:
        """Problems (empty if none) feeding this model with the given data settings; each names keys and a fix."""
        problems = []
        n_src, n_tgt = len(source_channels), len(target_channels)
        if self.in_channels != n_src:
            problems.append(
                f"the model takes {self.in_channels} input channel(s) but data.source_channels lists {n_src} "
                f"({', '.join(source_channels)}); set --model.kwargs.in_channels {n_src} or list "
                f"{self.in_channels} source channel(s)"
            )
        if self.out_channels != n_tgt:
            problems.append(
                f"the model predicts {self.out_channels} channel(s) but {target_key} lists {n_tgt} "
                f"({', '.join(target_channels)}); set --model.kwargs.out_channels {n_tgt} or list "
                f"{self.out_channels} target channel(s)"
            )
        if self.z_window_size != z_window_size:
            problems.append(
                f"the model takes {self.z_window_size} Z slice(s) but data.z_window_size is {z_window_size}; set "
                f"--data.z_window_size {self.z_window_size} or --model.kwargs.in_stack_depth {z_window_size}"
            )
        elif self.out_depth != target_depth:
            fix = "--data.target_2d true" if self.out_depth == 1 else "--data.target_2d false"
            problems.append(
                f"the model predicts {self.out_depth} Z slice(s) but the target has {target_depth} (data.target_2d, "
                f"data.z_window_size {z_window_size}); set {fix}"
            )
        y, x = (int(v) for v in yx_patch_size)
        if y % self.yx_multiple or x % self.yx_multiple:
            py, px = self.padded_yx(y, x)
            problems.append(
                f"data.yx_patch_size {y}x{x} is not a multiple of the model's YX multiple {self.yx_multiple}; "
                f"set --data.yx_patch_size {py} {px}"
            )
        return problems

    def padded_yx(self, y: int, x: int) -> tuple[int, int]:
        """Smallest valid (Y, X) that is >= the given size."""
        m = self.yx_multiple
        return -(-y // m) * m, -(-x // m) * m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_BUILTIN: dict[str, str] = {
    "unet2d": "viscy.models.unet:UNet2D",
    "unet25d": "viscy.models.unet:UNet25D",
    "unet3d": "viscy.models.unet:UNet3D",
    "unext2": "viscy.models.unext2:UNeXt2",
    "fcmae": "viscy.models.fcmae:FullyConvolutionalMAE",
}
_REGISTRY: dict[str, Callable[..., Any]] = {}
# Installed packages expose their networks under this group: [project.entry-points."viscy.models"].
ENTRY_POINT_GROUP = "viscy.models"
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a constructor (class or function) under ``name``, in this process only.

    Ray Train workers, predict actors and a later ``viscy export`` run in other processes and do not see it:
    for those, name the model by its import path (``model.name: package.module:Class``, importable on every
    node) or expose it as an entry point of the group ``viscy.models`` in the package's ``pyproject.toml``.
    """
    if ":" in name:
        raise ModelError(f"register_model({name!r}): ':' marks an import path; register a plain name")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ModelError(f"model {name!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return deco


def entry_point_models() -> dict[str, EntryPoint]:
    """The entry points of group ``viscy.models`` of the installed packages, by lower-case name."""
    from importlib.metadata import entry_points

    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name.lower(), ep)
    return found


def list_models() -> list[str]:
    """Model names, sorted: built-in, registered in this process and entry points of installed packages.

    Import paths (``package.module:Class``) are accepted wherever a name is, but not listed.
    """
    return sorted(set(_BUILTIN) | set(_REGISTRY) | set(entry_point_models()))


def is_import_path(name: str) -> bool:
    """Whether ``name`` is meant as an import path (``package.module:Class``) rather than a registry name."""
    return ":" in name


def canonical_name(name: str) -> str:
    """The name a model card stores: a registry name in lower case, an entry point's or a given import path.

    An entry point is stored as its import path, so the card rebuilds the model wherever the module imports.
    Unknown names are returned in lower case (resolving them raises).
    """
    if is_import_path(name):
        return name.strip()
    key = name.lower()
    if key not in _REGISTRY and key not in _BUILTIN:
        ep = entry_point_models().get(key)
        if ep is not None:
            return f"{ep.module}:{ep.attr}"
    return key


def same_model(a: str, b: str) -> bool:
    """Whether two model names name the same model (case-insensitive names, entry point = its import path)."""
    return canonical_name(a) == canonical_name(b)


def model_label(name: str) -> str:
    """A short file-name-safe label for run names: the class or function of an import path, else the name."""
    return name.rpartition(":")[2].rpartition(".")[2] if is_import_path(name) else name


def unknown_model_message(name: str) -> str:
    """What was tried for an unknown model name, and how to name a network of one's own."""
    from viscy.models.presets import list_presets

    tried = [
        f"a built-in architecture ({', '.join(sorted(_BUILTIN))})",
        f"a preset ({', '.join(list_presets())})",
    ]
    registered = sorted(set(_REGISTRY) - set(_BUILTIN))
    if registered:
        tried.append(f"a model registered in this process ({', '.join(registered)})")
    eps = sorted(entry_point_models())
    tried.append(f"an entry point of group '{ENTRY_POINT_GROUP}' ({', '.join(eps) or 'none installed'})")
    module, dot, attr = name.rpartition(".")
    hint = f" Did you mean {module}:{attr}? An import path puts ':' between module and class." if dot else ""
    return (
        f"unknown model {name!r}: it is not {', '.join(tried[:-1])} or {tried[-1]}, and not an import path.{hint} "
        "For a network of your own, give its import path package.module:Class (or package.module:function), "
        "importable on every node (install its package there or put its folder on PYTHONPATH), or expose it "
        f"as an entry point of group '{ENTRY_POINT_GROUP}'"
    )


def _check_import_path_form(path: str) -> None:
    if not _IMPORT_PATH.match(path):
        raise ModelError(
            f"model {path!r} is not a valid import path; write package.module:Class (dotted module, ':', then the "
            "class or function that builds the network)"
        )


def import_constructor(path: str, origin: str = "") -> Callable[..., Any]:
    """Import the class or function ``package.module:Attr`` names; :class:`ModelError` says why one cannot be.

    ``origin`` (e.g. the entry point that gave the path) prefixes the errors.
    """
    _check_import_path_form(path)
    where = f"model {path!r}{f' ({origin})' if origin else ''}"
    module_name, _, attr = path.partition(":")
    host = socket.gethostname()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelError(
                f"{where}: module {module_name!r} is not importable on this machine ({host}); install the package "
                "that provides it, or put the folder that holds it on PYTHONPATH, on every node (Ray workers "
                "import it too)"
            ) from None
        raise ModelError(
            f"{where}: importing {module_name!r} needs module {exc.name!r}, which is not installed on this machine "
            f"({host}); install it on every node"
        ) from exc
    except Exception as exc:  # the user's module failed while importing: say so, with its own message
        raise ModelError(f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                n for n, v in vars(module).items()
                if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module_name
            )
            raise ModelError(
                f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attr!r}; "
                f"it defines: {', '.join(defined) or 'no public class or function'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(
            f"{where}: {attr} is a {type(obj).__name__}, not callable; name the network's class (a torch.nn.Module) "
            "or a function that returns one"
        )
    return obj


def get_model_class(name: str) -> Callable[..., Any]:
    """The constructor ``name`` names.

    Tried in order: an import path (``package.module:Class``), a model registered in this process, a built-in
    architecture, an entry point of group ``viscy.models``. Raises :class:`ModelError` saying what was tried.
    """
    if is_import_path(name):
        return import_constructor(name.strip())
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _BUILTIN:
        fn = import_constructor(_BUILTIN[key])
        _REGISTRY.setdefault(key, fn)
        return fn
    ep = entry_point_models().get(key)
    if ep is not None:
        dist = getattr(ep.dist, "name", None)
        origin = f"entry point {ep.name!r} of group '{ENTRY_POINT_GROUP}'" + (f", package {dist}" if dist else "")
        return import_constructor(f"{ep.module}:{ep.attr}", origin)
    raise ModelError(unknown_model_message(name))


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


def model_kwargs(name: str) -> dict[str, Any]:
    """Constructor keyword arguments of ``name`` with their defaults (``inspect.Parameter.empty`` if none)."""
    return {
        p.name: p.default
        for p in _parameters(get_model_class(name))
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


# Constructor arguments that describe the data rather than the network, and the ModelSpec field each sets.
DATA_KWARGS = {"in_channels": "in_channels", "out_channels": "out_channels", "in_stack_depth": "z_window_size",
               "z_window_size": "z_window_size", "out_stack_depth": "out_depth"}


def fit_to_data(name: str, kwargs: dict[str, Any], **shape: int) -> dict[str, Any]:
    """``kwargs`` of architecture ``name`` with the data arguments it leaves out taken from the data.

    ``shape`` holds ``in_channels``, ``out_channels``, ``z_window_size`` and ``out_depth``. Given arguments are kept
    (a mismatch is then reported by :meth:`ModelSpec.check_data`); an architecture may complete others that
    depend on them (its ``fit_kwargs``, e.g. UNeXt2's stem for the Z window).
    """
    accepts = model_kwargs(name)
    out = dict(kwargs)
    for key, field in DATA_KWARGS.items():
        if key in accepts and key not in out:
            out[key] = int(shape[field])
    fit = getattr(get_model_class(name), "fit_kwargs", None)
    return fit(out) if fit is not None else out


def create_architecture(name: str, **kwargs: Any):
    """Build the model ``name`` names, with its :class:`ModelSpec` as ``model.spec`` (declared or derived).

    Unknown kwargs (for a constructor without ``**kwargs``) raise :class:`ModelError`.
    """
    fn = get_model_class(name)
    params = _parameters(fn)
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        allowed = model_kwargs(name)
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ModelError(f"{name}: unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        model = fn(**kwargs)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{name}: cannot build with {kwargs}: {exc}") from exc
    attach_spec(model, canonical_name(name), fn, kwargs)
    return model


def spec_template(name: str) -> str:
    """The ``spec`` property a model class can add; shown when its spec cannot be derived."""
    return (
        "add a `spec` property to the class (or set self.spec in __init__):\n"
        "    from viscy.models import ModelSpec\n\n"
        "    @property\n"
        "    def spec(self) -> ModelSpec:\n"
        f"        return ModelSpec(architecture={name!r}, in_channels=..., out_channels=..., z_window_size=...,\n"
        "                         out_depth=..., yx_multiple=...)\n"
        "(the input is (B, in_channels, z_window_size, Y, X) with Y and X multiples of yx_multiple, the output "
        "(B, out_channels, out_depth, Y, X)); or let viscy derive it: constructor arguments in_channels and "
        "out_channels (and in_stack_depth or z_window_size for a Z window), a class attribute yx_multiple when Y "
        "and X must be multiples of it"
    )


def attach_spec(model: Any, name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Make sure ``model.spec`` is a :class:`ModelSpec`: keep a declared one, else set :func:`derive_spec`'s."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        return
    if spec is not None:
        raise ModelError(f"{name}: model.spec is a {type(spec).__name__}, not a viscy ModelSpec; {spec_template(name)}")
    spec = derive_spec(name, fn, kwargs, model)
    try:
        model.spec = spec
    except AttributeError as exc:  # a read-only `spec` property that returned None
        raise ModelError(f"{name}: its spec property returned None; {spec_template(name)}") from exc


def derive_spec(name: str, fn: Callable[..., Any], kwargs: dict[str, Any], model: Any) -> ModelSpec:
    """The spec of a model that declares none, from its constructor arguments and one meta-device forward pass.

    ``in_channels`` and ``out_channels`` are the constructor's arguments (given or default); the Z window is its
    ``z_window_size`` or ``in_stack_depth`` argument, else a ``z_window_size`` attribute, else 1; ``yx_multiple``
    is a class attribute (default 1). ``out_depth`` is an ``out_depth`` attribute or, when absent, the output Z
    of a forward pass of a ``(1, in_channels, Z, Y, X)`` tensor on torch's ``meta`` device (no memory, no
    compute), which also checks the output's channels and YX.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    bound = inspect.signature(fn).bind_partial(**kwargs)
    bound.apply_defaults()
    args = bound.arguments
    missing = [k for k in ("in_channels", "out_channels") if not isinstance(args.get(k), int)]
    if missing:
        raise ModelError(
            f"{name} declares no spec and viscy cannot derive one: its constructor has no integer "
            f"{' and '.join(missing)} argument; {spec_template(name)}"
        )
    c_in, c_out = int(args["in_channels"]), int(args["out_channels"])
    z = args.get("z_window_size", args.get("in_stack_depth", getattr(model, "z_window_size", 1)))
    m = getattr(model, "yx_multiple", 1)
    declared_out = getattr(model, "out_depth", None)
    if not all(isinstance(v, int) and v >= 1 for v in (z, m)) or not (
        declared_out is None or (isinstance(declared_out, int) and declared_out >= 1)
    ):
        raise ModelError(
            f"{name}: Z window {z!r}, yx_multiple {m!r} and out_depth {declared_out!r} must be positive integers"
        )
    y, x = -(-64 // m) * m, -(-96 // m) * m  # Y != X, so swapped axes show
    shape_in = (1, c_in, z, y, x)
    try:
        out = _meta_forward(model, fn, kwargs, shape_in)
    except Exception as exc:  # an op without a meta kernel, or the network rejects the shape
        if declared_out is not None:
            return ModelSpec(name, c_in, c_out, z, declared_out, m)
        raise ModelError(
            f"{name} declares no spec and viscy cannot derive one: a forward pass of a {shape_in} tensor on torch's "
            f"meta device failed ({type(exc).__name__}: {exc}); {spec_template(name)}"
        ) from None
    out_shape = tuple(out.shape)
    if len(out_shape) != 5 or out_shape[:2] != (1, c_out) or out_shape[3:] != (y, x):
        raise ModelError(
            f"{name} declares no spec and viscy cannot derive one: a {shape_in} input gave {out_shape}, expected "
            f"(1, {c_out}, Z_out, {y}, {x}); {spec_template(name)}"
        )
    if declared_out is not None and declared_out != out_shape[2]:
        raise ModelError(f"{name}: out_depth is {declared_out} but a {shape_in} input gives {out_shape[2]} Z slice(s)")
    return ModelSpec(name, c_in, c_out, z, out_shape[2], m)


def _meta_forward(model: Any, fn: Callable[..., Any], kwargs: dict[str, Any], shape: tuple[int, ...]) -> Any:
    """The output of ``model`` (or, unless it is on the meta device already, a meta copy) for a meta input."""
    import itertools

    import torch

    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    with torch.device("meta"), torch.no_grad():
        probe = model if first is not None and first.is_meta else fn(**kwargs)
        training = probe.training
        probe.eval()
        try:
            out = probe(torch.empty(shape))
        finally:
            probe.train(training)
    return out[0] if isinstance(out, (tuple, list)) else out
