"""Where control sockets live, how a server claims and releases one, and how ``ctl`` finds it.

Theory of operation. As tmux does (``/tmp/tmux-UID/``), the servers of one user keep their
sockets in one private directory: ``$XDG_RUNTIME_DIR/portside``, or ``<tempdir>/portside-UID``
without a runtime directory. It must be a real directory (not a symlink), owned by the user and
closed to group and others (portside creates it with mode 0700); one that fails a check is
refused, never repaired, since whoever controls it could squat or swap sockets. Each server
binds ``<pid>.sock`` there, so two servers never share a socket, and ``ctl`` picks the server by
``--pid``, or the only one running, and lists them when there are several. ``--control PATH``
names a socket anywhere instead; such a server leaves ``<pid>.link`` (a symbolic link to its
socket) in the private directory, so that ``ctl servers`` and ``ctl`` without flags find it too.

Nothing is removed unless it is provably dead or ours: a server removes its own socket (same
process, same inode) when it stops, also after a failed start; a socket file that refuses
connections (and, in the private directory, whose pid is gone) is stale and may be replaced;
anything else at the path, a regular file above all, is left alone with an error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from types import TracebackType
from typing import NamedTuple

from portside.errors import ControlError, ListenError

SUFFIX = ".sock"
LINK_SUFFIX = ".link"  # a server with --control PATH elsewhere: a symlink to its socket
BACKLOG = 16
#: The control socket's descriptor, handed by a supervisor to its successor (USR2).
INHERIT_ENV = "PORTSIDE_CONTROL_FD"


def control_directory() -> str:
    """The private directory of this user's control sockets (not created here)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "portside")
    import tempfile  # only here: ``portside ctl`` need not pay for it

    return os.path.join(tempfile.gettempdir(), f"portside-{os.getuid()}")


def check_private(path: str) -> None:
    """ControlError unless ``path`` is a directory (not a symlink) of ours, mode 0700 or
    stricter."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ControlError(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"{path} is not a directory; refusing to use it for control sockets")
    if info.st_uid != os.getuid():
        raise ControlError(f"{path} belongs to uid {info.st_uid}, not to you (uid "
                           f"{os.getuid()}); refusing to use it for control sockets")
    if info.st_mode & 0o077:
        raise ControlError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: others could "
                           "reach the control sockets in it; refusing to use it (want 0700)")


def ensure_directory() -> str:
    """The private directory, created with mode 0700 if missing, and checked."""
    path = control_directory()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    check_private(path)
    return path


def probe(path: str) -> bool | None:
    """True when a server answers at ``path``, False when it is a socket nobody listens on
    (stale), None when it is missing or not a socket."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
    except TimeoutError:
        return True  # a full backlog: someone listens, busy
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT) else \
            (False if exc.errno == errno.ECONNREFUSED else None)
    else:
        return True
    finally:
        sock.close()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(name: str, suffix: str = SUFFIX) -> int | None:
    stem = name[:-len(suffix)] if name.endswith(suffix) else ""
    return int(stem) if stem.isdigit() else None


def _remove_if_stale(path: str, pid: int | None) -> bool:
    """Unlink ``path`` if it is a socket proven dead: refused, and its pid (if any) gone."""
    if probe(path) is not False or (pid is not None and _pid_running(pid)):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


class Found(NamedTuple):
    """A live server in the private directory."""

    pid: int
    path: str

    def describe(self) -> str:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as file:
                words = file.read(400).split(b"\0")
            command = " ".join(word.decode(errors="replace") for word in words if word)
        except OSError:
            command = ""
        return f"pid {self.pid}  {self.path}" + (f"  ({command})" if command else "")


def running_servers() -> list[Found]:
    """The live servers of this user in the private directory, by pid."""
    directory = control_directory()
    try:
        check_private(directory)
        names = os.listdir(directory)
    except (ControlError, OSError):
        return []
    found = []
    for name in names:
        pid = _pid_of(name)
        path = os.path.join(directory, name)
        if pid is not None and probe(path):
            found.append(Found(pid, path))
        pid = _pid_of(name, LINK_SUFFIX)
        if pid is not None and _pid_running(pid):
            with contextlib.suppress(OSError):
                target = os.readlink(path)
                if probe(target):
                    found.append(Found(pid, target))
    return sorted(found, key=lambda entry: entry.pid)


def resolve(control: str | None, pid: int | None) -> str:
    """The socket the user means: ``--control``, ``--pid``, or the only server running."""
    if control:
        return control
    directory = control_directory()
    if pid is not None:
        check_private(directory)
        return os.path.join(directory, f"{pid}{SUFFIX}")
    servers = running_servers()
    if not servers:
        if os.path.lexists(directory):
            check_private(directory)  # say why, when the directory is the reason
        raise ControlError(f"no portside server is running (looked in {directory}); "
                           "pass --control PATH for a server with its own socket")
    if len(servers) > 1:
        listing = "; ".join(server.describe() for server in servers)
        raise ControlError(f"{len(servers)} portside servers are running, choose one with "
                           f"--pid PID or --control PATH: {listing}")
    return servers[0].path


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", credentials)[1])


class ControlSocket:
    """One server's control socket, bound at once: a context manager that removes it on exit,
    so a start that fails after the socket was made leaves nothing behind.

    ``path`` None means ``<private directory>/<pid>.sock``.

    Upgrades (USR2) hand the socket over rather than close and bind it again, so that ``ctl``
    is answered throughout: the old supervisor passes the listening descriptor
    (``INHERIT_ENV``) and keeps answering on it; the new one ``adopts`` it but leaves it
    alone (it never removes a socket it has not ``claimed``) until its workers serve, then
    ``claims`` it (renamed to its own ``<pid>.sock`` in the private directory) while the old
    one ``releases`` its copy without removing the file.
    """

    def __init__(self, path: str | None = None) -> None:
        self.explicit = path is not None
        try:
            if path is None:
                directory = ensure_directory()
                self._sweep(directory)
                path = os.path.join(directory, f"{os.getpid()}{SUFFIX}")
        except ControlError as exc:
            raise ListenError(f"cannot create the control socket: {exc}") from None
        self.path = path
        self.closed = True
        self._identity: tuple[int, int] | None = None
        self._wanted: str | None = None
        self._link: str | None = None
        inherited = os.environ.pop(INHERIT_ENV, "")
        if inherited.isdigit() and self._adopt(int(inherited)):
            return
        self.reopen()

    def _adopt(self, fd: int) -> bool:
        """Take the control socket a supervisor handed over, if it is the one asked for."""
        try:
            sock = socket.socket(fileno=fd)
            bound = sock.getsockname()
        except OSError:
            return False
        same_place = os.path.dirname(bound) == os.path.dirname(self.path) if not self.explicit \
            else bound == self.path
        if not isinstance(bound, str) or not same_place:
            sock.close()  # --control changed: bind the new path, the old one stays its owner's
            return False
        sock.setblocking(False)
        self.sock = sock
        self._owner = os.getpid()
        self._wanted, self.path = self.path, bound
        self.closed = False
        return True

    @property
    def adopted(self) -> bool:
        """Handed over by the supervisor being upgraded, and not claimed yet."""
        return self._wanted is not None

    def claim(self) -> None:
        """Make an adopted socket ours (our workers serve): under our own name, removed when
        we stop."""
        if self._wanted is None or self.closed:
            return
        if self._wanted != self.path:
            try:
                os.rename(self.path, self._wanted)  # atomic: the socket has a name throughout
                self.path = self._wanted
            except OSError:
                pass  # it keeps the old name, still reachable
        self._wanted = None
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        self._register()

    def release(self) -> None:
        """Close our copy without removing the file: a successor serves it now."""
        if not self.closed:
            self.closed = True
            self.sock.close()
            self._unregister()

    def inheritable_fd(self) -> int | None:
        """The descriptor to hand a successor (made inheritable), or None if closed."""
        if self.closed:
            return None
        os.set_inheritable(self.sock.fileno(), True)
        return self.sock.fileno()

    def reopen(self) -> None:
        """Bind the socket (again, after ``close``: an upgrade that failed takes it back)."""
        self.sock = self._bind(self.path)
        self._owner = os.getpid()
        info = os.stat(self.path)
        self._identity = (info.st_dev, info.st_ino)
        self.closed = False
        self._register()

    @staticmethod
    def _sweep(directory: str) -> None:
        """Remove the sockets and links of servers that died without cleaning up (kill -9)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                pid = _pid_of(name)
                if pid is not None and pid != os.getpid():
                    _remove_if_stale(os.path.join(directory, name), pid)
                pid = _pid_of(name, LINK_SUFFIX)
                if pid is not None and not _pid_running(pid):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))

    def _register(self) -> None:
        """Leave ``<pid>.link`` to a socket outside the private directory, so that ``ctl``
        finds this server without ``--control``; best effort (the server runs without)."""
        if not self.explicit or self._link is not None:
            return
        try:
            directory = ensure_directory()
            self._sweep(directory)
            link = os.path.join(directory, f"{os.getpid()}{LINK_SUFFIX}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)  # a dead server's, whose pid we were given again
            os.symlink(os.path.abspath(self.path), link)
        except (ControlError, OSError):
            return
        self._link = link

    def _unregister(self) -> None:
        if self._link is not None and os.getpid() == self._owner:
            with contextlib.suppress(OSError):
                os.unlink(self._link)
        self._link = None

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if not path:
            raise ListenError("the control socket path is empty")
        if os.path.lexists(path):
            state = probe(path)
            if state is None:
                raise ListenError(f"cannot create control socket {path}: something that is "
                                  "not a socket is there (not removing it)")
            if state or not _remove_if_stale(path, None):
                raise ListenError(f"control socket {path} is in use by another server")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket is open to others
        try:
            sock.bind(path)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or exc
            raise ListenError(f"cannot create control socket {path}: {reason}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        """Close it and remove the file, only if it is still the one this process made. Once:
        after that the file at ``path`` is someone else's (an upgraded supervisor's), even if
        the file system gave it the freed inode number again."""
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        self._unregister()
        if os.getpid() != self._owner or self._identity is None:
            return  # a forked child's, or adopted and never claimed: the file is another's
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)

    def close_in_child(self) -> None:
        """In a forked worker: close the copy of the descriptor, leave the file alone."""
        self.sock.close()

    def __enter__(self) -> ControlSocket:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
