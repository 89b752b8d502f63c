"""The public surface and the layers, checked (after trio's ``test_exports.py``).

``portside.__all__`` is exactly the intended public API and every name in it resolves; no
engine class appears in a public signature; and each layer imports only the layers below it,
type-level imports (``if TYPE_CHECKING:``) and function-local ones included. What today's
code still breaks is listed as a named, explained exception; a listed exception that no
longer happens fails too, so the lists only shrink.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import portside

PACKAGE = Path(portside.__file__).resolve().parent

#: The public API: what a user imports from ``portside``. Changing it is a decision, made here.
PUBLIC = {
    # configuration
    "KIB", "SECONDS", "AcceptPolicy", "Engine", "ListenerConfig", "ServerConfig",
    # handlers and what they are given
    "Handler", "MessageHandler", "StreamHandler", "StreamReader", "StreamWriter",
    "Connection", "ConnectAttempt", "CloseReason", "AcceptingReason", "ErrorOrigin",
    "ListenerView", "RateLimitedLog",
    "Framer", "LengthPrefixFramer", "LineFramer",
    # running servers
    "Server", "IOPool", "ServerState",
    # statistics
    "ConnectionCounters", "ListenerStatistics", "OutboundStatistics", "ServerStatistics",
    "PoolStatistics",
    # errors
    "PortsideError", "ConfigError", "ConnectionClosedError", "ListenError", "ProtocolError",
    "ServerStateError",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(portside.__all__) == PUBLIC
    assert len(portside.__all__) == len(set(portside.__all__))
    assert set(dir(portside)) >= PUBLIC


def test_every_export_resolves_and_is_portsides_own() -> None:
    for name in portside.__all__:
        value = getattr(portside, name)
        if isinstance(value, type | types.FunctionType):
            assert value.__module__.startswith("portside."), (name, value.__module__)
            assert value.__name__ == name, f"portside.{name} is {value.__name__}"
    with pytest.raises(AttributeError, match="no attribute 'Listener'"):
        portside.Listener  # noqa: B018  (an engine class is not exported)


def test_star_import_gives_exactly_all_in_a_fresh_interpreter() -> None:
    """``from portside import *`` resolves every lazily imported name (PEP 562)."""
    probe = ("import portside\n"
             "namespace = {}\n"
             "exec('from portside import *', namespace)\n"
             "print(sorted(set(namespace) - {'__builtins__'}) == sorted(portside.__all__))\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.strip() == "True", run.stderr


# -- no engine class in a public signature ---------------------------------------------------------

#: Engine classes still in a public signature, by the function that has them and the argument
#: (or "return"): none; a public protocol (``ListenerView``, ``Connection``, ``ConnectAttempt``)
#: stands in each place.
KNOWN_ENGINE_TYPES: dict[tuple[str, str], str] = {}


def _type_checking_namespace(module: types.ModuleType) -> dict[str, Any]:
    """The names ``module`` imports only for type checkers (``if TYPE_CHECKING:``)."""
    namespace: dict[str, Any] = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__name__, "exec"),
                 namespace)
    return namespace


def _classes(hint: Any) -> Iterator[type]:
    """Every class a type hint names, inside unions, generics and callables."""
    stack = [hint]
    while stack:
        hint = stack.pop()
        if isinstance(hint, type):
            yield hint
        origin = typing.get_origin(hint)
        if isinstance(origin, type):
            yield origin
        stack.extend(typing.get_args(hint))


def _public_functions() -> Iterator[tuple[str, Any]]:
    """Each public method, property and ``__init__`` of each exported class, once, by the
    qualified name of the function that defines it."""
    seen: set[str] = set()
    for name in portside.__all__:
        value = getattr(portside, name)
        if not isinstance(value, type):
            continue
        for member_name, member in inspect.getmembers(value):
            if member_name.startswith("_") and member_name != "__init__":
                continue
            function = member.fget if isinstance(member, property) else member
            if not inspect.isfunction(function) or function.__qualname__ in seen:
                continue
            if not function.__module__.startswith("portside"):
                continue
            seen.add(function.__qualname__)
            yield function.__qualname__, function


def test_no_engine_class_in_a_public_signature() -> None:
    public_classes = {getattr(portside, name) for name in portside.__all__}
    found: dict[tuple[str, str], str] = {}
    namespaces: dict[str, dict[str, Any]] = {}
    for qualname, function in _public_functions():
        module = sys.modules[function.__module__]
        if module.__name__ not in namespaces:
            namespaces[module.__name__] = {**_type_checking_namespace(module), **vars(module)}
        hints = typing.get_type_hints(function, globalns=namespaces[module.__name__])
        for argument, hint in hints.items():
            for klass in _classes(hint):
                if klass.__module__.startswith("portside.engine") and \
                        klass not in public_classes:
                    found[qualname, argument] = f"{klass.__module__}.{klass.__qualname__}"
    assert found == KNOWN_ENGINE_TYPES


# -- layers ------------------------------------------------------------------------------------

#: Portside's layers, lowest first: a module may import its own layer and those below it.
LAYERS = [
    # text: escaping peer text for display (pure); reasons: CloseReason, AcceptingReason
    ["portside.errors", "portside.text", "portside.reasons"],
    ["portside.protocols"],  # sans-IO: bytes in, messages out
    ["portside.statistics", "portside.config", "portside.settings", "portside.ordering",
     "portside.argparsing"],
    ["portside.connection", "portside.handler", "portside.messages", "portside.streams"],
    ["portside.engine"],
    ["portside.server"],
    ["portside.control", "portside.metrics", "portside.workers", "portside.top"],
    ["portside.cli", "portside.__main__", "portside"],  # the package re-exports the API
]

#: Besides the layers: what the light ``portside ctl`` / ``portside top`` path (the control
#: client) must not import, so that it neither pays for nor depends on a server.
CONTROL_CLIENT = ["portside.control.client", "portside.control.command",
                  "portside.control.paths", "portside.control.protocol", "portside.top"]
SERVER_SIDE = ["portside.engine", "portside.server", "portside.workers", "portside.metrics",
               "portside.control.server", "portside.control.target", "portside.control.fleet"]

#: What the examples may import: the public API (the package, and the modules whose names
#: it documents: settings, errors, the sans-IO protocols; ``protocols._resp`` is cimported by
#: the RESP example's compiled fast path through ``_resp.pxd``, the framer's C interface).
EXAMPLES_MAY_IMPORT = ["portside.config", "portside.errors", "portside.protocols",
                       "portside.examples"]

#: Imports that break a rule today, each with why; (importer, imported) module names.
KNOWN_LAYER_BREACHES = {
    # portside relay grew from an example into a command with health checks, deadlines and
    # statistics of its own: it belongs in the library (a relay module above the engine), not
    # in examples/, and uses engine internals until it moves there.
    **{("portside.examples.relay", module): "the relay is a command, not yet a library module"
       for module in ("portside.engine.lograte", "portside.engine.reactor",
                      "portside.engine.timeouts", "portside.engine.connection",
                      "portside.statistics", "portside.connection")},
    # PoolStatistics is declared in the engine's buffers.py, not with the other statistics.
    ("portside.statistics", "portside.engine.buffers"): "PoolStatistics lives in the engine",
    # ListenerConfig.handler is typed Handler | str (type-level only).
    ("portside.config", "portside.handler"): "ListenerConfig.handler's type",
    # Handler.server_started(server: Server) and friends (type-level): the circle
    # config -> handler -> engine -> server -> config closes here.
    ("portside.handler", "portside.server"): "the server hooks are typed with Server",
    # The CLI checks the relay example's own flags (--upstream, --send-proxy, ...).
    ("portside.cli", "portside.examples"): "the relay's flags are parsed by the CLI",
}

_IMPORT_LINE = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+c?import\b|c?import\s+([\w.]+))")


def _module_name(path: Path) -> str:
    parts = ("portside", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The portside modules ``path`` imports anywhere (type-level and local imports too)."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    if path.suffix == ".pyx":  # Cython: its import and cimport lines
        for line in path.read_text().splitlines():
            if match := _IMPORT_LINE.match(line):
                found.add(match[1] or match[2])
    else:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    found.add(".".join([*base, *([node.module] if node.module else [])]))
                else:
                    found.add(node.module or "")
    resolved = set()
    for module in found:
        if module.startswith("."):  # a relative import in a .pyx
            module = f"{package}{module[1:]}" if module != "." else package
        if module == "portside" or module.startswith("portside."):
            resolved.add(module)
    return resolved


def _import_graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path)
            for path in sorted(PACKAGE.rglob("*"))
            if path.suffix in (".py", ".pyx") and "__pycache__" not in path.parts}


def _within(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer): the longest prefix names it
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, [prefix]) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _breaches() -> dict[tuple[str, str], str]:
    breaches: dict[tuple[str, str], str] = {}
    for importer, imported_modules in _import_graph().items():
        for imported in imported_modules:
            if _within(imported, ["portside.examples"]):
                if not _within(importer, ["portside.examples"]):
                    breaches[importer, "portside.examples"] = "the library imports an example"
                continue
            if _within(importer, ["portside.examples"]):
                if imported != "portside" and not _within(imported, EXAMPLES_MAY_IMPORT):
                    breaches[importer, imported] = "an example uses a private module"
                continue
            low, high = _layer(imported), _layer(importer)
            assert low is not None and high is not None, (importer, imported)
            if low > high:
                breaches[importer, imported] = "imports a layer above it"
            elif _within(importer, CONTROL_CLIENT) and _within(imported, SERVER_SIDE):
                breaches[importer, imported] = "the control client imports the server side"
    return breaches


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _import_graph()
                if _layer(m) is None and not _within(m, ["portside.examples"])]
    assert not unplaced, f"give these a layer in LAYERS: {unplaced}"


def test_layers_import_only_the_layers_below_them() -> None:
    breaches = _breaches()
    new = {pair: why for pair, why in breaches.items() if pair not in KNOWN_LAYER_BREACHES}
    assert not new, f"imports that break the layers: {new}"
    gone = set(KNOWN_LAYER_BREACHES) - set(breaches)
    assert not gone, f"fixed (remove them from KNOWN_LAYER_BREACHES): {sorted(gone)}"


def test_the_layer_check_sees_type_level_and_cython_imports() -> None:
    """The check itself: what it must find in today's code."""
    graph = _import_graph()
    assert "portside.server" in graph["portside.handler"]  # under ``if TYPE_CHECKING:``
    assert "portside.engine.connection" in graph["portside.engine._compiled"]  # a .pyx
    assert "portside.cli" in graph["portside.__main__"]
    assert "portside.protocols._resp" in graph["portside.examples._resp_store"]  # a cimport
