"""What one serving process needs from its settings: the handler classes (the command's and each
listener's own), imported from the app directory; the TLS context, from the certificate files;
listeners on inherited descriptors.

Both the single-process command and every worker process use these, so a handler is loaded
the same way (and fails the same way: one ``ConfigError`` line) wherever it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from portside.errors import ConfigError

if TYPE_CHECKING:
    import ssl

    from portside.config import ListenerConfig, ProcessConfig
    from portside.handler import Handler


def load_handler(spec: str, app_dir: str | None = None) -> type[Handler]:
    """Import ``MODULE:CLASS`` (from ``app_dir`` first, as gunicorn and uvicorn import from the
    current directory); any failure, even an exception raised by the module, is one line."""
    from portside.handler import Handler

    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"expected MODULE:CLASS, got {spec!r}")
    if app_dir is not None:
        directory = os.path.abspath(app_dir)
        if not os.path.isdir(directory):
            raise ConfigError(f"--app-dir {app_dir!r} is not a directory")
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:  # where the user's file is wrong, not where importlib was
        where = f" ({os.path.basename(exc.filename)}:{exc.lineno})" if exc.filename else ""
        raise ConfigError(f"cannot import {module_name!r}: SyntaxError: {exc.msg}{where}"
                          ) from None
    except ImportError as exc:
        where = "" if exc.name == module_name else _where(exc)  # the module's own import
        raise ConfigError(f"cannot import {module_name!r}: {exc}{where}") from None
    except BaseException as exc:  # a module may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        where = _where(exc)
        raise ConfigError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
                          f"{where}") from None
    try:
        handler_class = getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no class {class_name!r}"
                          f"{_closest(class_name, module)}") from None
    if not (isinstance(handler_class, type) and issubclass(handler_class, Handler)):
        raise ConfigError(f"{spec!r} is not a portside Handler subclass (found "
                          f"{_kind(handler_class)})")
    return handler_class


def _closest(name: str, module: object) -> str:
    """`` (did you mean 'Greeter'?)``: the Handler subclass of ``module`` nearest ``name``,
    else the only one it has; or nothing."""
    import difflib

    from portside.handler import Handler

    classes = sorted(attr for attr, value in vars(module).items()
                     if isinstance(value, type) and issubclass(value, Handler)
                     and value is not Handler)
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.5) or \
        (classes if len(classes) == 1 else [])
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: object) -> str:
    """What was found instead of a Handler subclass: "class Shout", "int"."""
    return f"class {value.__name__}" if isinstance(value, type) else type(value).__name__


def make_handler(factory: Callable[[], Handler], name: str) -> Handler:
    """Call the handler's constructor; its exception becomes one ``ConfigError`` line."""
    try:
        return factory()
    except Exception as exc:
        raise ConfigError(f"{name}() raised {type(exc).__name__}: {exc}{_where(exc)}") from None


def load_listener_handlers(listeners: Sequence[ListenerConfig], app_dir: str | None,
                           default: tuple[str, Handler] | None = None) -> list[ListenerConfig]:
    """The listeners with each ``MODULE:CLASS`` handler text (``--listen ADDRESS=MODULE:CLASS``)
    imported and made: one instance per distinct text, shared by the listeners that name it,
    and the ``default`` (text, instance) where a listener names the command's own class."""
    made: dict[str, Handler] = dict([default]) if default is not None else {}
    loaded = []
    for listener in listeners:
        spec = listener.handler
        if isinstance(spec, str):
            if spec not in made:
                handler_class = load_handler(spec, app_dir)
                made[spec] = make_handler(handler_class, handler_class.__name__)
            listener = dataclasses.replace(listener, handler=made[spec])
        elif spec is None and default is None:
            raise ConfigError(f"{listener.description} has no handler: give MODULE:CLASS, or "
                              "--listen ADDRESS=MODULE:CLASS")
        loaded.append(listener)
    return loaded


def describe_handlers(default: str | None, listeners: Sequence[ListenerConfig]) -> str:
    """The handler classes served, for the start-up line: the default first."""
    specs = [default] if default else []
    for listener in listeners:
        spec = listener.handler if isinstance(listener.handler, str) else None
        if spec and spec not in specs:
            specs.append(spec)
    return ", ".join(specs)


def _where(exc: BaseException) -> str:
    """`` (file.py:12)``: the innermost frame of a traceback, so a one-line error says where."""
    tb = exc.__traceback__
    found = ""
    while tb is not None:  # importlib's own frames (<frozen ...>) are not where the user erred
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<frozen "):
            found = f" ({os.path.basename(filename)}:{tb.tb_lineno})"
        tb = tb.tb_next
    return found


def tls_context(process: ProcessConfig) -> ssl.SSLContext | None:
    """The server context from ``certfile``/``keyfile``, or None; bad files are one line."""
    if not process.certfile and not process.keyfile:
        return None
    if not (process.certfile and process.keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(process.certfile, process.keyfile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"cannot load TLS certificate {process.certfile!r} and key "
                          f"{process.keyfile!r}: {reason}") from None
    if process.tls_alpn:
        context.set_alpn_protocols([p.strip() for p in process.tls_alpn.split(",")
                                    if p.strip()])
    return context


def inherited_socket(fd: int) -> socket.socket:
    """The listening stream socket at descriptor ``fd`` (``fd://N``), checked."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"fd://{fd} is not a socket: {exc.strerror or exc}") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"fd://{fd} is not a stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(f"fd://{fd} is not listening")
    os.set_inheritable(fd, True)
    return sock
