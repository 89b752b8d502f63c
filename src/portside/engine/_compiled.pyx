# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=False
"""Portside's compiled engine: the hot paths of ``epoll.py``, ``buffers.py``, ``connection.py``
and ``listener.py``, in the same structure and under the same names.

Theory of operation. The pure-Python engine is the reference; this module holds only what runs
per event: the epoll loop (``Loop``, the twin of ``EpollReactor``), the buffer pool, and the
connection's read, write and flush paths and the listener's accept loop as extension-type bases
(``ConnectionBase``, ``ListenerBase``). ``compiled.py`` derives the engine's classes from these
bases and gives them every other method of the reference classes unchanged (PROXY, TLS, the
timeouts' policies, statistics, admission): those are one copy, run by both engines.

Written twice, on purpose: the read, write and flush paths, the close paths (``_close_c``,
``_abort_c``, ``_finalize_c``: they run on every connection and touch the C state), the accept
loop, the epoll loop, the pools and the deadline queues. ``tests/test_engine_differential.py``
drives both engines through the same event sequences and compares what the handler sees,
close reasons, counters and statistics; it is what keeps the twins the same, not their
construction. What both need but must not differ on has one home, used from here: the states,
the accept errno sets and the sendmsg batch (``states.py``, built into ``_constants.pxi``), the
close tally (``states.count_close``), and the rule for Handler's default callbacks (looked up
at each call, ``runs_default``).

On the echo path a read is: ``epoll_wait`` -> ``recv`` into a pooled buffer -> one Python call
(``handler.data_received``) -> ``conn.write``, a C method that ``send``s at once when nothing is
queued. A handler is lent a view of the pooled buffer; a buffer some view still exports when the
callback returns is dropped from the pool, never reused, so a kept view never shows another
connection's bytes. Each buffer keeps the memoryview it lends and lends it again, resized to the
read, for as long as nothing can reach it after the callback (a reference, a weak one, a slice
or an export): making and freeing a memoryview (two garbage-collected objects and a buffer
export) per read was the engine's largest own cost. The view's ``obj`` is the buffer, which
exports this read's bytes only; a handler that keeps it keeps the buffer out of the pool.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.ref cimport Py_REFCNT
from libc.errno cimport (  # EWOULDBLOCK is EAGAIN on Linux
    EAGAIN,
    EINTR,
    errno,
)
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport strerror

import heapq
import logging
import threading
from collections import deque

from portside.engine.connection import _LINGER_RST
from portside.engine.connection import layer_origin
from portside.engine.connection import _id_counter as id_counter
from portside.engine.states import CloseReason, count_close
from portside.engine.core import _log_closed as log_closed
from portside.engine.listener import _trusted as trusted_peer
from portside.errors import ConnectionClosedError, ErrorOrigin
from portside.handler import Handler
from portside.statistics import TTFB_BUCKETS

cdef extern from "Python.h":
    # CPython's memoryview and its managed buffer, by field name (the layout is the compiler's):
    # the read path resizes the view it lends and counts who else holds it.
    ctypedef struct _PyManagedBufferObject:
        Py_ssize_t exports  # views made over this one export, slices included
    ctypedef struct PyMemoryViewObject:
        _PyManagedBufferObject *mbuf
        int flags
        Py_ssize_t exports  # buffers exported from this view (bytes(view) and the like)
        Py_buffer view
        void *weakreflist  # not NULL while a weak reference to the view is alive
    enum: _Py_MEMORYVIEW_RELEASED
    int PyBuffer_IsContiguous(const Py_buffer *view, char order)

cdef extern from *:
    # Those structs are private: their layout is known only for the CPython versions setup.py
    # passes in (pyproject.toml's classifiers), with the GIL. Built for anything else, the
    # module refuses to import, before any of them is touched, and ``auto`` runs epoll.
    """
    #if defined(PYPY_VERSION)
    #  define PORTSIDE_UNSUPPORTED "built for PyPy, not CPython"
    #elif defined(Py_GIL_DISABLED)
    #  define PORTSIDE_UNSUPPORTED "built for a free-threaded CPython"
    #elif !defined(PORTSIDE_PY_FIRST) || !defined(PORTSIDE_PY_END) || !defined(PORTSIDE_PYTHONS)
    #  define PORTSIDE_UNSUPPORTED "built without setup.py's supported CPython versions"
    #elif PY_VERSION_HEX < PORTSIDE_PY_FIRST || PY_VERSION_HEX >= PORTSIDE_PY_END
    #  define PORTSIDE_UNSUPPORTED "built for CPython " PY_VERSION ", not among the tested " \
                                  PORTSIDE_PYTHONS
    #else
    #  define PORTSIDE_UNSUPPORTED ""
    #endif
    """
    const char *PORTSIDE_UNSUPPORTED

if PORTSIDE_UNSUPPORTED[0]:
    raise ImportError(f"the compiled engine is unsupported here: {PORTSIDE_UNSUPPORTED.decode()}")

cdef object CLOSED_REASON = CloseReason.CLOSED
cdef object ABORTED_REASON = CloseReason.ABORTED
cdef object RESET_REASON = CloseReason.RESET
cdef object PEER_EOF_REASON = CloseReason.PEER_EOF
cdef object HANDLER_ERROR_REASON = CloseReason.HANDLER_ERROR
cdef object SOCKET_ERROR_REASON = CloseReason.SOCKET_ERROR
cdef object READ_ORIGIN = ErrorOrigin.READ
cdef object WRITE_ORIGIN = ErrorOrigin.WRITE
cdef object CALLBACK_ORIGIN = ErrorOrigin.CALLBACK
cdef object RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
cdef bytes LINGER_RST = _LINGER_RST  # SO_LINGER on, 0 s: close sends RST (connection.py's)

cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data_t "epoll_data":
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    cdef struct sockaddr:
        sa_family_t sa_family
    cdef struct sockaddr_storage:
        sa_family_t ss_family
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int c_setsockopt "setsockopt"(int fd, int level, int name, const void *value, socklen_t len)
    int c_shutdown "shutdown"(int fd, int how)
    int c_getsockname "getsockname"(int fd, sockaddr *addr, socklen_t *addrlen)
    enum:
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        AF_INET
        AF_INET6
        AF_UNIX
        IPPROTO_TCP_ "IPPROTO_TCP"
        SOL_SOCKET_ "SOL_SOCKET"
        SO_LINGER_ "SO_LINGER"

cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    unsigned short ntohs(unsigned short)
    uint32_t ntohl(uint32_t)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<sys/un.h>" nogil:
    cdef struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from *:
    """
    #include <sys/syscall.h>
    #include <unistd.h>
    /* recv and send as bare system calls: glibc's wrappers are cancellation points, and
       entering and leaving one costs more than the rest of a small echo's user-space work. */
    static inline ssize_t portside_recv(int fd, void *buf, size_t n) {
        return syscall(SYS_recvfrom, fd, buf, n, 0, NULL, NULL);
    }
    static inline ssize_t portside_send(int fd, const void *buf, size_t n) {
        return syscall(SYS_sendto, fd, buf, n, MSG_NOSIGNAL, NULL, 0);
    }
    """
    ssize_t portside_recv(int fd, void *buf, size_t n) nogil
    ssize_t portside_send(int fd, const void *buf, size_t n) nogil

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)
    ssize_t c_read "read"(int fd, void *buf, size_t n)
    ssize_t c_write "write"(int fd, const void *buf, size_t n)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    enum:
        CLOCK_MONOTONIC

logger = logging.getLogger("portside.engine")

# The connection states, the accept errno sets (capacity_errno, skip_errno) and SENDMSG_BATCH:
# states.py's, written here by setup.py at build time.
include "_constants.pxi"

cdef enum:
    MAX_EVENTS = 256

# A registered descriptor's byte in Loop._masks.
cdef enum:
    WANT_READ = 1
    WANT_WRITE = 2
    INTEREST = 3
    KNOWN = 0x80

#: The constants as built, for the test that they still match states.py.
BUILT_CONSTANTS = {"State": {"PENDING": PENDING, "OPEN": OPEN, "CLOSING": CLOSING,
                             "LINGERING": LINGERING, "CLOSED": CLOSED},
                   "SENDMSG_BATCH": SENDMSG_BATCH}


def built_errno_test(str name, int code):
    """``capacity_errno`` or ``skip_errno`` as built, for the test against states.py."""
    return capacity_errno(code) if name == "CAPACITY_ERRNOS" else skip_errno(code)


cdef char *FORMAT_BYTE = "B"
cdef uint32_t READ = EPOLLIN
cdef uint32_t WRITE = EPOLLOUT
cdef uint32_t TROUBLE = EPOLLHUP | EPOLLERR


cdef inline double monotonic() noexcept nogil:
    """CLOCK_MONOTONIC, the clock ``time.monotonic`` reads: one clock for both engines."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <double>now.tv_sec + <double>now.tv_nsec * 1e-9


cdef object os_error(int code):
    """The OSError subclass Python raises for ``code`` (ConnectionResetError for ECONNRESET)."""
    return OSError(code, strerror(code).decode("utf-8", "replace"))


# -- the loop (epoll.py) -----------------------------------------------------------------------


@cython.final
cdef class Timer:
    """One scheduled callback; ordered by due time, then by creation (as epoll.py's _Timer)."""

    cdef public double when
    cdef public unsigned long long seq
    cdef public object callback
    cdef public bint cancelled

    def __lt__(self, Timer other):
        return self.when < other.when or (self.when == other.when and self.seq < other.seq)

    def cancel(self):
        self.cancelled = True
        self.callback = None  # drop the reference now: the heap keeps the timer until it is due


cdef void run_guarded(object callback):
    try:
        callback()
    except Exception:
        logger.exception("internal error in scheduled callback %r", callback)


cdef type fast_connection_type = None


def set_connection_type(type kind):
    """The engine's plain connection class: the loop calls its compiled paths directly."""
    global fast_connection_type
    fast_connection_type = kind


@cython.final
cdef class Loop:
    """The twin of ``EpollReactor``: level-triggered epoll, a timer heap, an eventfd waker.

    Targets live in a list indexed by descriptor (8 bytes per descriptor, not a dict entry);
    the mask of each descriptor in a byte array beside it.
    """

    cdef int epfd
    cdef int wake_fd
    cdef list _targets
    cdef bytearray _masks  # per fd: KNOWN | WANT_READ | WANT_WRITE; 0 when not registered
    cdef list _timers
    cdef unsigned long long _timer_seq
    cdef object _ready
    cdef bint _stopping
    cdef object _thread_id
    cdef Py_ssize_t _count
    cdef object _wake_lock  # as epoll.py's: no wake-up ever reaches a closed descriptor

    def __cinit__(self):
        self.epfd = -1
        self.wake_fd = -1

    def __init__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise os_error(errno)
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise os_error(errno)
        self._wake_lock = threading.RLock()
        self._targets = []
        self._masks = bytearray()
        self._timers = []
        self._timer_seq = 0
        self._ready = deque()
        self._stopping = False
        self._thread_id = None
        self._count = 0
        self.register(self.wake_fd, _Waker(self.wake_fd), True, False)

    @staticmethod
    def time():
        return monotonic()

    cdef inline void _grow(self, int fd):
        cdef Py_ssize_t more = fd + 1 - len(self._targets)
        if more > 0:
            more = max(more, len(self._targets))  # doubling: amortised O(1)
            self._targets.extend([None] * more)
            self._masks.extend(bytes(more))

    cdef int _ctl(self, int op, int fd, int interest) except -1:
        cdef epoll_event event
        event.events = (READ if interest & WANT_READ else 0) | (WRITE if interest & WANT_WRITE else 0)
        event.data.u64 = 0
        event.data.fd = fd
        if epoll_ctl(self.epfd, op, fd, &event) < 0:
            raise os_error(errno)
        return 0

    def register(self, int fd, target, bint readable, bint writable):
        if fd < 0:
            raise ValueError(f"bad file descriptor {fd}")
        self._register(fd, target, (WANT_READ if readable else 0)
                       | (WANT_WRITE if writable else 0))

    cdef int _register(self, int fd, target, int interest) except -1:
        self._grow(fd)
        if interest:
            self._ctl(EPOLL_CTL_ADD, fd, interest)
        if self._targets[fd] is None:
            self._count += 1
        self._targets[fd] = target
        self._masks[fd] = KNOWN | interest
        return 0

    def modify(self, int fd, bint readable, bint writable):
        self._modify(fd, readable, writable)

    cdef int _modify(self, int fd, bint readable, bint writable) except -1:
        cdef int interest = (WANT_READ if readable else 0) | (WANT_WRITE if writable else 0)
        cdef int current
        if fd < 0 or fd >= len(self._targets) or not self._masks[fd]:
            raise KeyError(fd)
        current = self._masks[fd] & INTEREST
        if current == interest:
            return 0
        if not interest:
            self._ctl(EPOLL_CTL_DEL, fd, 0)
        elif not current:
            self._ctl(EPOLL_CTL_ADD, fd, interest)
        else:
            self._ctl(EPOLL_CTL_MOD, fd, interest)
        self._masks[fd] = KNOWN | interest
        return 0

    def unregister(self, int fd, bint closing=False):
        self._unregister(fd, closing)

    cdef int _unregister(self, int fd, bint closing) except -1:
        if fd < 0 or fd >= len(self._targets) or self._targets[fd] is None:
            return 0  # not registered (or already unregistered)
        cdef int interest = self._masks[fd] & INTEREST
        self._targets[fd] = None
        self._masks[fd] = 0
        self._count -= 1
        # Closing the last descriptor of a socket removes it from every epoll set.
        if interest and not closing:
            self._ctl(EPOLL_CTL_DEL, fd, 0)
        return 0

    def targets(self):
        return [target for target in self._targets if target is not None]

    def call_soon(self, callback):
        self._ready.append(callback)

    def call_soon_threadsafe(self, callback):
        cdef uint64_t one = 1
        self._ready.append(callback)  # deque.append is atomic under the GIL
        # Wake the loop even from its own thread: a signal handler runs there (see epoll.py);
        # after close(), nothing is written (see epoll.py).
        with self._wake_lock:
            if self.wake_fd >= 0:
                c_write(self.wake_fd, &one, 8)

    def call_later(self, double delay, callback):
        cdef Timer timer = Timer.__new__(Timer)
        self._timer_seq += 1
        timer.when = monotonic() + max(0.0, delay)
        timer.seq = self._timer_seq
        timer.callback = callback
        timer.cancelled = False
        heapq.heappush(self._timers, timer)
        return timer

    def in_loop_thread(self):
        return self._thread_id == threading.get_ident()

    def stop(self):
        self._stopping = True

    def run(self):
        """Dispatch events, timers and callbacks until ``stop()`` is called."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int count, i, fd, timeout_ms
        cdef uint32_t ev
        cdef double delay
        cdef list targets = self._targets
        cdef list timers = self._timers
        cdef Timer timer
        cdef object target
        cdef object ready = self._ready
        cdef type fast = fast_connection_type
        cdef ConnectionBase conn
        self._thread_id = threading.get_ident()
        self._stopping = False
        try:
            while not self._stopping:
                if ready:
                    timeout_ms = 0
                elif timers:
                    delay = (<Timer>timers[0]).when - monotonic()
                    # Round up: waking a little early would spin until the timer is due.
                    timeout_ms = 0 if delay <= 0 else <int>(delay * 1000.0) + 1
                else:
                    timeout_ms = -1
                with nogil:
                    count = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
                if count < 0:
                    if errno == EINTR:
                        count = 0
                    else:
                        raise os_error(errno)
                for i in range(count):
                    fd = events[i].data.fd
                    ev = events[i].events
                    target = targets[fd]
                    if target is None:
                        continue
                    try:
                        if type(target) is fast:
                            conn = <ConnectionBase>target
                            if ev & READ:
                                conn._read_ready()
                                if ev & WRITE and targets[fd] is target:
                                    conn._write_ready()
                            elif ev & TROUBLE and self._masks[fd] & WANT_READ:
                                conn._read_ready()
                            elif ev & (WRITE | TROUBLE):
                                conn._write_ready()
                        else:
                            if ev & READ:
                                target.handle_read()
                                if ev & WRITE and targets[fd] is target:
                                    target.handle_write()
                            elif ev & TROUBLE and self._masks[fd] & WANT_READ:
                                target.handle_read()
                            elif ev & (WRITE | TROUBLE):
                                target.handle_write()
                    except Exception:  # a bug in portside itself: keep serving everyone else
                        logger.exception("internal error handling fd %d", fd)
                # Drop the last target: a reference left here would keep a closed connection
                # from being recycled (the pool only takes back unshared objects).
                target = None
                conn = None
                if timers:
                    now = monotonic()
                    while timers and (<Timer>timers[0]).when <= now:
                        timer = <Timer>heapq.heappop(timers)
                        if not timer.cancelled:
                            run_guarded(timer.callback)
                        timer = None
                for i in range(len(ready)):
                    run_guarded(ready.popleft())
        finally:
            self._thread_id = None

    def close(self):
        """Release the epoll and wake-up descriptors; the loop must not be running."""
        if self.epfd >= 0:
            c_close(self.epfd)
            self.epfd = -1
        with self._wake_lock:
            if self.wake_fd >= 0:
                c_close(self.wake_fd)
                self.wake_fd = -1


cdef class _Waker:
    """Reads the eventfd so that a cross-thread wake-up does not stay readable forever."""

    cdef int fd

    def __init__(self, int fd):
        self.fd = fd

    def handle_read(self):
        cdef uint64_t value
        c_read(self.fd, &value, 8)

    def handle_write(self):  # never registered for writing
        pass


# -- the buffer pool (buffers.py) --------------------------------------------------------------


@cython.final
cdef class IOBuffer:
    """A fixed-size block of memory lent for one read. It exports ``length`` bytes (all of it,
    unless the read path set fewer) and counts the views alive, so the pool can tell whether a
    handler kept one."""

    cdef char *data
    cdef Py_ssize_t size
    cdef Py_ssize_t length
    cdef Py_ssize_t exports
    cdef Py_ssize_t shape[1]
    cdef object lent  # the memoryview the read path lends, kept for the next read; or None

    def __cinit__(self, Py_ssize_t size):
        self.data = <char *>malloc(size if size > 0 else 1)
        if self.data is NULL:
            raise MemoryError()
        self.size = size
        self.length = size
        self.exports = 0

    def __dealloc__(self):
        free(self.data)

    def __len__(self):
        return self.length

    def __getbuffer__(self, Py_buffer *view, int flags):
        self.shape[0] = self.length
        view.buf = self.data
        view.obj = self
        view.len = self.length
        view.readonly = 0
        view.itemsize = 1
        view.format = FORMAT_BYTE if flags & 0x0004 else NULL  # PyBUF_FORMAT
        view.ndim = 1
        view.shape = self.shape if flags & 0x0008 else NULL  # PyBUF_ND
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1


@cython.final
cdef class BufferPool:
    """The twin of buffers.BufferPool, over ``IOBuffer``s: same interface, same statistics.

    The free buffers are ``_hot`` (the one given back last, which the next read takes) and the
    first ``_free_count`` slots of ``_slots``, a stack that never shrinks: popping and appending
    a list on every read made the list resize (realloc) twice per read."""

    cdef public Py_ssize_t buffer_size
    cdef public Py_ssize_t max_free
    cdef list _slots
    cdef Py_ssize_t _free_count  # in _slots; the hot buffer, if any, is one more
    cdef IOBuffer _hot
    cdef Py_ssize_t _created
    cdef Py_ssize_t _misses
    cdef public Py_ssize_t returned
    cdef Py_ssize_t _discarded

    def __init__(self, Py_ssize_t buffer_size, Py_ssize_t max_free, Py_ssize_t preallocate=1):
        self.buffer_size = buffer_size
        self.max_free = max_free
        self._slots = [IOBuffer(buffer_size) for _ in range(min(preallocate, max_free))]
        self._free_count = len(self._slots)
        self._created = self._free_count
        self._misses = 0
        self.returned = 0
        self._discarded = 0

    cdef inline IOBuffer _acquire(self):
        cdef IOBuffer buffer
        if self._hot is not None:  # the buffer the last read gave back
            buffer = self._hot
            self._hot = None
        elif self._free_count:
            self._free_count -= 1
            buffer = <IOBuffer>self._slots[self._free_count]
            self._slots[self._free_count] = None
        else:
            self._misses += 1
            self._created += 1
            buffer = IOBuffer(self.buffer_size)
        buffer.length = buffer.size
        return buffer

    cdef inline void _give_back(self, IOBuffer buffer):
        self.returned += 1
        # Beyond its own lent view (one export while kept), a view of it outlived its loan:
        # never reuse it.
        if buffer.exports > (buffer.lent is not None):
            self._discarded += 1
            self._created -= 1
        elif self._hot is None and self._free_count < self.max_free:
            self._hot = buffer  # one field, not the list: a read takes it straight back
        elif self._free_count + 1 < self.max_free:
            if self._free_count < len(self._slots):
                self._slots[self._free_count] = buffer
            else:
                self._slots.append(buffer)
            self._free_count += 1
        else:
            self._discarded += 1
            self._created -= 1

    cdef inline void _drop(self, IOBuffer buffer):
        """A lent buffer something kept (a handler holds ``view.obj``): never lent again."""
        self.returned += 1
        self._discarded += 1
        self._created -= 1

    def allocate(self):
        self._misses += 1
        self._created += 1
        return IOBuffer(self.buffer_size)

    def acquire(self):
        return self._acquire()

    def give_back(self, IOBuffer buffer):
        self._give_back(buffer)

    release = give_back

    def discard(self):
        self._discarded += 1
        self._created -= 1

    def statistics(self):
        from portside.engine.buffers import PoolStatistics

        free = self._free_count + (self._hot is not None)
        in_use = self._created - free
        return PoolStatistics(self.buffer_size, free, in_use, self.max_free,
                              self.returned + in_use - self._misses, self._misses,
                              self._discarded)




# -- deadlines (deadlines.py, timeouts.py) -------------------------------------------------------


@cython.final
cdef class DeadlineQueue:
    """The twin of deadlines.DeadlineQueue: one timeout for all, so a dict in insertion order
    is a queue whose front expires first; add, discard and refresh are O(1)."""

    cdef public double timeout
    cdef dict _due

    def __init__(self, double timeout):
        self.timeout = timeout
        self._due = {}

    def __len__(self):
        return len(self._due)

    def __contains__(self, item):
        return item in self._due

    cdef inline void _add(self, item, double now):
        if item in self._due:
            del self._due[item]
        self._due[item] = now + self.timeout

    def add(self, item, double now):
        self._add(item, now)

    cdef inline void _discard(self, item):
        if item in self._due:
            del self._due[item]

    def discard(self, item):
        self._discard(item)

    def next_due(self):
        for due in self._due.values():
            return due
        return None

    def pop_expired(self, double now):
        cdef list expired = []
        for item, due in self._due.items():
            if <double>due > now:
                break
            expired.append(item)
        for item in expired:
            del self._due[item]
        return expired

    def pop_older_than(self, double age, double now):
        return self.pop_expired(now + self.timeout - age)


@cython.final
cdef class TimeoutTracker:
    """The twin of timeouts.TimeoutTracker: deadlines of one kind for one listener, one timer
    armed for the oldest; ``expire`` is called for each that passes (counted unless it returns
    False)."""

    cdef public DeadlineQueue queue
    cdef public Py_ssize_t expired
    cdef object _expire
    cdef object _reactor
    cdef object _timer

    def __init__(self, double timeout, expire):
        self.queue = DeadlineQueue(timeout)
        self.expired = 0
        self._expire = expire
        self._reactor = None
        self._timer = None

    def attach(self, reactor):
        self._reactor = reactor

    def start(self, conn):
        """Start, or restart, ``conn``'s countdown."""
        self.queue._add(conn, monotonic() if type(self._reactor) is Loop else self._reactor.time())
        if self._timer is None:
            self._arm()

    def stop(self, conn):
        self.queue._discard(conn)

    cdef void _arm(self):
        due = self.queue.next_due()
        reactor = self._reactor
        if due is not None and reactor is not None:
            self._timer = reactor.call_later(due - reactor.time(), self._sweep)

    def _sweep(self):
        # ``_timer`` still names the timer now running until the end: a start() from an
        # ``expire`` callback then leaves the arming to this sweep instead of adding a timer.
        for conn in self.queue.pop_expired(self._reactor.time()):
            if self._expire(conn) is not False:
                self.expired += 1
        self._timer = None
        self._arm()

# -- the engine's shared state and the connection pool (core.py, buffers.py) --------------------


@cython.final
cdef class ObjectPool:
    """The twin of buffers.ObjectPool: reuses objects nobody outside portside references.

    Free objects are the first ``_free_count`` slots of a stack that never shrinks."""

    cdef object _factory
    cdef public Py_ssize_t max_free
    cdef list _slots
    cdef Py_ssize_t _free_count
    cdef Py_ssize_t _in_use
    cdef Py_ssize_t _hits
    cdef Py_ssize_t _misses
    cdef Py_ssize_t _discarded

    def __init__(self, factory, Py_ssize_t max_free, Py_ssize_t preallocate):
        self._factory = factory
        self.max_free = max_free
        self._slots = [factory() for _ in range(min(preallocate, max_free))]
        self._free_count = len(self._slots)
        self._in_use = self._hits = self._misses = self._discarded = 0

    cdef inline object _acquire(self):
        self._in_use += 1
        if self._free_count:
            self._hits += 1
            self._free_count -= 1
            item = self._slots[self._free_count]
            self._slots[self._free_count] = None
            return item
        self._misses += 1
        return self._factory()

    def acquire(self):
        return self._acquire()

    cdef bint _take_back(self, item, Py_ssize_t refcount):
        """``refcount`` as the caller saw it, holding ``item`` in one local only."""
        self._in_use -= 1
        if self._free_count < self.max_free and refcount <= UNSHARED_REFCOUNT:
            if self._free_count < len(self._slots):
                self._slots[self._free_count] = item
            else:
                self._slots.append(item)
            self._free_count += 1
            return True
        self._discarded += 1
        return False

    def recycle(self, item):
        return self._take_back(item, Py_REFCNT(item) - 1)  # less this call's own argument

    def statistics(self):
        from portside.engine.buffers import PoolStatistics

        return PoolStatistics(0, self._free_count, self._in_use, self.max_free, self._hits,
                              self._misses, self._discarded)


cdef Py_ssize_t unshared_refcount():
    """What Py_REFCNT says of an object held in one local only, measured the way
    ``CoreBase._recycle`` takes it (a list pop into a local)."""
    cdef list items = [object()]
    item = items.pop()
    return Py_REFCNT(item)


cdef Py_ssize_t UNSHARED_REFCOUNT = unshared_refcount()


cdef class CoreBase:
    """``core.EngineCore``'s fields, and its per-connection methods."""

    cdef public object reactor
    cdef public object handler
    cdef public object config
    cdef public object buffers
    cdef public object connection_pool
    cdef public Py_ssize_t open
    cdef public Py_ssize_t miscounted
    cdef public list _to_recycle
    cdef public object _on_idle
    cdef public object _connection_class
    cdef public bint _log_connections

    def new_connection(self):
        """A connection object, from the pool."""
        return self._new_connection()

    cdef object _new_connection(self):
        conn = (<ObjectPool>self.connection_pool)._acquire()
        self.open += 1
        return conn

    def connection_finished(self, conn):
        self._connection_finished(conn)

    cdef int _connection_finished(self, conn) except -1:
        if self.open <= 0:  # never a negative count: a drain would wait for it for ever
            (<object>self).finished_twice(conn)
            return 0
        self.open -= 1
        if self._log_connections:
            log_closed(conn, monotonic())
        # Recycle on the next iteration: now, the closing call chain still references it.
        if not self._to_recycle:
            self.reactor.call_soon(self._recycle)
        self._to_recycle.append(conn)
        if not self.open:
            self._on_idle()
        return 0

    def _recycle(self):
        cdef list pending = self._to_recycle
        cdef ObjectPool pool = <ObjectPool>self.connection_pool
        self._to_recycle = []
        while pending:
            conn = pending.pop()
            pool._take_back(conn, Py_REFCNT(conn))
            conn = None

# -- sockets without socket objects -------------------------------------------------------------


cdef object address_from(const sockaddr *addr, socklen_t length):
    """What ``socket.accept`` says of a peer: (host, port) for IPv4, (host, port, flowinfo,
    scope_id) for IPv6, the path (or b"" for an abstract one) for a Unix socket."""
    cdef char text[64]
    cdef const sockaddr_in *v4
    cdef const sockaddr_in6 *v6
    cdef const sockaddr_un *unix
    if addr.sa_family == AF_INET:
        v4 = <const sockaddr_in *>addr
        inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(v4.sin_port))
    if addr.sa_family == AF_INET6:
        v6 = <const sockaddr_in6 *>addr
        inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(v6.sin6_port), ntohl(v6.sin6_flowinfo),
                v6.sin6_scope_id)
    if addr.sa_family == AF_UNIX:
        unix = <const sockaddr_un *>addr
        if length <= sizeof(sa_family_t):
            return ""  # an unnamed client socket, as socket.accept says
        if unix.sun_path[0] == 0:  # the abstract namespace: bytes, as CPython gives them
            return (<char *>unix.sun_path)[:length - sizeof(sa_family_t)]
        return (<char *>unix.sun_path).decode("utf-8", "surrogateescape")
    return None


cdef object packed_address(const sockaddr *addr):
    """The peer's IP address as the kernel gave it (4 or 16 bytes), the input of the per-client
    limits' key (admission.py): no tuple and no text. None for any other family."""
    if addr.sa_family == AF_INET:
        return PyBytes_FromStringAndSize(<char *>&(<const sockaddr_in *>addr).sin_addr, 4)
    if addr.sa_family == AF_INET6:
        return PyBytes_FromStringAndSize(<char *>&(<const sockaddr_in6 *>addr).sin6_addr, 16)
    return None


@cython.final
@cython.no_gc
cdef class FdSocket:
    """The socket calls the connection's colder paths make (shutdown, SO_LINGER, close,
    ``local_address``, the lingering read), on a bare descriptor: an accepted connection
    needs no ``socket.socket`` object, and gets this one only when such a path runs."""

    cdef int fd

    def __cinit__(self, int fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def shutdown(self, int how):
        if c_shutdown(self.fd, how) < 0:
            raise os_error(errno)

    def setsockopt(self, int level, int name, value):
        cdef int number
        cdef Py_buffer view
        cdef int result
        if isinstance(value, int):
            number = value
            result = c_setsockopt(self.fd, level, name, &number, sizeof(int))
        else:
            PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
            result = c_setsockopt(self.fd, level, name, view.buf, <socklen_t>view.len)
            PyBuffer_Release(&view)
        if result < 0:
            raise os_error(errno)

    def getsockname(self):
        cdef sockaddr_storage addr
        cdef socklen_t length = sizeof(addr)
        if c_getsockname(self.fd, <sockaddr *>&addr, &length) < 0:
            raise os_error(errno)
        return address_from(<sockaddr *>&addr, length)

    def recv_into(self, buffer, Py_ssize_t nbytes=0, int flags=0):
        cdef Py_buffer view
        cdef ssize_t received
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE | 0x0001)  # PyBUF_WRITABLE
        try:
            received = c_recv(self.fd, view.buf, <size_t>(nbytes or view.len), flags)
        finally:
            PyBuffer_Release(&view)
        if received < 0:
            raise os_error(errno)
        return received


# Handler's own callbacks, which the compiled paths do inline instead of calling
# (Handler.connection_made passes first_data on, eof_received closes, the others do nothing),
# so an echo costs one Python call per read and no more.
cdef object HANDLER_MADE = Handler.connection_made
cdef object HANDLER_EOF = Handler.eof_received
cdef object HANDLER_CLOSED = Handler.connection_closed
cdef object HANDLER_RESET = Handler.connection_reset
cdef object HANDLER_DRAINED = Handler.write_drained
cdef object HANDLER_PAUSE = Handler.pause_writing
cdef object HANDLER_RESUME = Handler.resume_writing

cdef dict CALLBACK_DEFAULTS = {
    "connection_made": HANDLER_MADE, "eof_received": HANDLER_EOF,
    "connection_closed": HANDLER_CLOSED, "connection_reset": HANDLER_RESET,
    "write_drained": HANDLER_DRAINED, "pause_writing": HANDLER_PAUSE,
    "resume_writing": HANDLER_RESUME,
}


cdef inline bint runs_default(handler, str name, default) except -1:
    """Whether ``handler.<name>`` is Handler's own ``default`` right now: no subclass and no
    instance attribute took it over. Asked at each call, as connection.py's ``_call`` looks
    the callback up at each call (Handler's docstring states the rule): three C-level lookups,
    no Python call and no allocation."""
    if getattr(type(handler), name, None) is not default:
        return False
    instance = getattr(handler, "__dict__", None)
    return instance is None or name not in <dict>instance


# -- the connection (connection.py) --------------------------------------------------------------

# ConnectionBase._flags
cdef enum:
    F_EOF = 1
    F_ESTABLISHED = 2
    F_FLOW_PAUSED = 4
    F_HELD = 8
    F_READING = 16
    F_USER_PAUSED = 32
    F_WRITING = 64
    F_WRITE_EOF = 128


@cython.final
cdef class Extras:
    """What only some connections need: made on first use, dropped at the next accept."""

    cdef public object linger_timer
    cdef public object preamble
    cdef public object balancer_address
    cdef public object proxy
    cdef public object sock
    cdef public object peer
    cdef public object receiver
    cdef public object tls


#: The reference's attribute for each ConnectionBase._flags bit, and for each Extras field.
FLAG_BITS = {"_eof": F_EOF, "_established": F_ESTABLISHED, "_flow_paused": F_FLOW_PAUSED,
             "_held": F_HELD, "_reading": F_READING, "_user_paused": F_USER_PAUSED,
             "_writing": F_WRITING, "_write_eof": F_WRITE_EOF}
EXTRA_FIELDS = {"_linger_timer": "linger_timer", "_preamble": "preamble",
                "balancer_address": "balancer_address", "proxy": "proxy",
                "_receiver": "receiver", "_tls": "tls"}


cdef class ConnectionBase:
    """Every field of ``connection.Connection``, its read, write and flush paths, and its life
    cycle from accept to ``connection_closed``; ``compiled.py`` adds the rest."""

    cdef public Py_ssize_t _buffered
    cdef public object _core
    cdef public object _corked
    cdef public int _fd
    cdef public object _handler
    cdef public object _idle
    cdef public object _pool
    cdef public object _queue
    cdef public int _state
    cdef public double accepted_at
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public object close_reason
    cdef public object layer
    cdef public long long id
    cdef public object listener
    cdef public object user_data
    cdef public long long _read_mark
    cdef public int _silent_looks
    # Laid out for an idle connection's sake (10,000 of them are 10,000 of these): the flags
    # in one word, what only some connections need (PROXY, lingering, a socket object for a
    # cold path, a peer address asked for) in one object made when first needed, and the
    # peer's address as the kernel gave it until someone asks.
    cdef unsigned int _flags
    cdef Extras _extras
    cdef unsigned short _peer_family
    cdef unsigned short _peer_port
    cdef uint32_t _peer_flow
    cdef uint32_t _peer_scope
    cdef unsigned char _peer_ip[16]

    def __cinit__(self):
        self._state = CLOSED
        self._fd = -1

    # -- fields the reference keeps plainly, as it sees them ---------------------------------

    cdef inline bint _has(self, unsigned int flag) noexcept:
        return self._flags & flag != 0

    cdef inline void _put(self, unsigned int flag, bint on) noexcept:
        if on:
            self._flags |= flag
        else:
            self._flags &= ~flag

    # The flags and the rarely used fields, as the reference's plain attributes: compiled.py
    # makes a property of each name in FLAG_BITS and EXTRA_FIELDS over these four.
    def _get_flag(self, unsigned int flag):
        return self._has(flag)

    def _set_flag(self, unsigned int flag, bint on):
        self._put(flag, on)

    def _get_extra(self, str field):
        return getattr(self._extras, field) if self._extras is not None else None

    def _set_extra(self, str field, value):
        if value is not None or self._extras is not None:
            setattr(self._more(), field, value)

    cdef inline Extras _more(self):
        if self._extras is None:
            self._extras = Extras.__new__(Extras)
        return self._extras

    @property
    def _sock(self):
        cdef Extras more = self._more()
        if more.sock is None and self._fd >= 0:
            more.sock = FdSocket(self._fd)
        return more.sock

    @_sock.setter
    def _sock(self, sock):
        if sock is not None or self._extras is not None:
            self._more().sock = sock

    @property
    def peer_address(self):
        cdef Extras more
        if self._extras is not None and self._extras.peer is not None:
            return self._extras.peer
        if not self._peer_family:
            return None
        more = self._more()
        more.peer = self._peer_tuple()
        return more.peer

    @peer_address.setter
    def peer_address(self, address):
        self._more().peer = address
        self._peer_family = 0

    cdef object _peer_tuple(self):
        cdef char text[64]
        if self._peer_family == AF_INET:
            inet_ntop(AF_INET, self._peer_ip, text, sizeof(text))
            return (text.decode("ascii"), self._peer_port)
        if self._peer_family == AF_INET6:
            inet_ntop(AF_INET6, self._peer_ip, text, sizeof(text))
            return (text.decode("ascii"), self._peer_port, self._peer_flow, self._peer_scope)
        return ""

    cdef void _keep_peer(self, const sockaddr *addr, socklen_t length):
        cdef const sockaddr_in *v4
        cdef const sockaddr_in6 *v6
        self._peer_family = 0
        if addr.sa_family == AF_INET:
            v4 = <const sockaddr_in *>addr
            self._peer_family = AF_INET
            self._peer_port = ntohs(v4.sin_port)
            (<uint32_t *>self._peer_ip)[0] = v4.sin_addr.s_addr
        elif addr.sa_family == AF_INET6:
            v6 = <const sockaddr_in6 *>addr
            self._peer_family = AF_INET6
            self._peer_port = ntohs(v6.sin6_port)
            self._peer_flow = ntohl(v6.sin6_flowinfo)
            self._peer_scope = v6.sin6_scope_id
            for i in range(16):
                self._peer_ip[i] = v6.sin6_addr.s6_addr[i]
        else:  # Unix sockets (and anything else): as Python would say it
            self._more().peer = address_from(addr, length)

    # -- life cycle, from the accept loop ------------------------------------------------------

    cdef int _attach_accepted(self, ListenerBase listener, int fd, const sockaddr *addr,
                              socklen_t length, bint pending) except -1:
        """``Connection.attach`` for a descriptor the compiled accept loop took."""
        cdef CoreBase core = <CoreBase>listener._core
        self.id = next(id_counter)
        self.user_data = None
        self.listener = listener
        self._extras = None
        self._keep_peer(addr, length)
        self.bytes_in = self.bytes_out = 0
        self.accepted_at = monotonic()
        self.close_reason = None
        self._core = core
        self._handler = listener.handler  # each listener may speak its own protocol
        self._pool = core.buffers
        self._idle = listener.idle_tracker
        self._fd = fd
        self._state = PENDING if pending else OPEN
        self._flags = F_READING
        if self._queue is not None:
            self._queue.clear()
        self._buffered = 0
        self._corked = None
        self.layer = None
        self._read_mark = 0
        self._silent_looks = 0
        if pending:  # a PROXY header, TLS or the first bytes come before the handler
            (<object>self)._start_layers()
        reactor = core.reactor
        if type(reactor) is Loop:
            (<Loop>reactor)._register(fd, self, WANT_READ)
        else:
            reactor.register(fd, self, True, False)
        return 0

    def _use_handler(self, handler):
        """The handler this connection's callbacks go to (an outbound connection names its
        own handler: outbound.py)."""
        self._handler = handler

    def establish(self, first_data):
        """Hand the connection to the handler: ``connection_made`` (with data when data-first)."""
        self._establish(first_data)

    cdef int _establish(self, first_data) except -1:
        self._state = OPEN
        self._flags |= F_ESTABLISHED
        # An outbound connection's listener is its Connector (outbound.py): looked up by name.
        listener = self.listener
        silence = ((<ListenerBase>listener).silence if isinstance(listener, ListenerBase)
                   else listener.silence)
        if silence is not None:  # read_timeout is on: it runs until the handler takes it over
            self._read_mark = self.bytes_in
            silence.start(self)
        try:
            if runs_default(self._handler, "connection_made", HANDLER_MADE):
                if first_data is not None:
                    self._handler.data_received(self, first_data)
            else:
                self._handler.connection_made(self, first_data)
        except Exception as exc:
            self._handler_failed(exc)
        return 0

    # -- reading ---------------------------------------------------------------------------------

    def handle_read(self):
        self._read_ready()

    cdef int _read_ready(self) except -1:
        cdef int state = self._state
        cdef IOBuffer buffer
        cdef BufferPool pool
        cdef ssize_t received
        cdef int code
        cdef PyMemoryViewObject *view
        cdef Py_ssize_t held, held_buffer
        cdef bint kept_buffer
        if state >= CLOSING:
            if state == LINGERING:
                self._discard_until_eof()
            return 0
        pool = <BufferPool>self._pool
        buffer = pool._acquire()
        received = portside_recv(self._fd, buffer.data, buffer.size)
        if received < 0:
            code = errno
            pool._give_back(buffer)
            if code != EAGAIN and code != EINTR:
                self._failed(os_error(code), READ_ORIGIN)
            return 0
        if received == 0:
            pool._give_back(buffer)
            self._peer_eof_c()
            return 0
        if not self.bytes_in:
            if isinstance(self.listener, ListenerBase):
                (<ListenerBase>self.listener)._record_first_byte(monotonic() - self.accepted_at)
            else:  # an outbound connection's Connector
                self.listener.record_first_byte(monotonic() - self.accepted_at)
        self.bytes_in += received
        if self._idle is not None:
            self._idle.start(self)
        data = buffer.lent
        if data is None:
            data = PyMemoryView_FromObject(buffer)  # over the whole buffer: length is its size
            buffer.lent = data
        view = <PyMemoryViewObject *>data
        view.view.len = received
        view.view.shape[0] = received
        buffer.length = received  # what ``data.obj`` exports: this read's bytes, no more
        held = Py_REFCNT(data)
        held_buffer = Py_REFCNT(buffer)
        receiver = self._extras.receiver if self._extras is not None else None
        try:
            if receiver is None:
                self._handler.data_received(self, data)
            else:  # a PROXY header, TLS, or a data-first connection's first bytes
                receiver(self, data)
        except Exception as exc:
            # What escapes a receiver is portside's own (connection.layer_origin).
            self._handler_failed(exc, CALLBACK_ORIGIN if receiver is None
                                 else layer_origin(receiver))
        finally:
            # Nobody kept the view (strongly or weakly), a slice of it or an export from it:
            # lend it again next time. Otherwise a handler that kept ``data`` gets an error,
            # not another peer's bytes; a slice or export it kept holds an export of the
            # buffer, which the pool then drops. A handler that kept the buffer itself
            # (``data.obj``) keeps it for good: never lent again, it goes on showing this read.
            kept_buffer = Py_REFCNT(buffer) != held_buffer
            if (Py_REFCNT(data) != held or view.exports or view.mbuf.exports != 1
                    or view.weakreflist != NULL or kept_buffer):
                buffer.lent = None
                try:
                    data.release()
                except BufferError:
                    pass
            data = None
            if kept_buffer:
                pool._drop(buffer)
            else:
                pool._give_back(buffer)
        return 0

    def _receive_first_data(self, data):
        """Pending on a data-first listener: the first bytes make the connection active."""
        self._extras.receiver = None
        (<ListenerBase>self.listener)._became_active(self)
        self._establish(data)

    def _peer_eof(self):
        self._peer_eof_c()

    cdef int _peer_eof_c(self) except -1:
        self._flags |= F_EOF
        if self._state == PENDING:
            self._set_reason_c(PEER_EOF_REASON)
            self._finalize_c()
            return 0
        self._flags &= ~F_READING
        self._call_c("eof_received", HANDLER_EOF)
        # Reading stops now, unless the callback closed the connection already: a close
        # right after the peer's FIN then costs no epoll_ctl at all.
        self._update_reading_c()
        return 0

    # -- writing ---------------------------------------------------------------------------------

    cdef int _write_refused(self) except -1:
        # Writes after close() or abort() are the handler's bug; after the peer or an error
        # closed the connection they are dropped silently (as in Connection.write).
        if (self._state == PENDING or self.close_reason is CLOSED_REASON
                or self.close_reason is ABORTED_REASON):
            raise ConnectionClosedError(f"connection {self.id} is closed")
        return 0

    def write(self, data):
        """Queue ``data`` to be sent in order; never blocks (see ``Connection.write``)."""
        cdef Py_buffer view
        cdef ssize_t sent
        cdef Py_ssize_t size
        cdef int code
        if self._state != OPEN:
            self._write_refused()
            return
        if self._extras is not None and self._extras.tls is not None:
            (<object>self)._write_tls(data)
            return
        if self._queue:
            self._send_bytes(data)
            return
        if self._corked is not None:
            self._corked.append(bytes(data))  # copied: ``data`` may be a lent buffer
            return
        if type(data) is memoryview and not (
                (<PyMemoryViewObject *>data).flags & _Py_MEMORYVIEW_RELEASED) and \
                PyBuffer_IsContiguous(&(<PyMemoryViewObject *>data).view, b'C'):
            # What the handler was lent, written back (the echo path): its bytes are right
            # there, without asking the view for an export and releasing it.
            size = (<PyMemoryViewObject *>data).view.len
            sent = portside_send(self._fd, (<PyMemoryViewObject *>data).view.buf, <size_t>size)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            size = view.len
            sent = portside_send(self._fd, view.buf, <size_t>size)
            PyBuffer_Release(&view)
        if sent < 0:
            code = errno
            if code != EAGAIN and code != EINTR:
                self._failed(os_error(code), WRITE_ORIGIN)
                return
            sent = 0
        if sent:
            self.bytes_out += sent
            if self._idle is not None:
                self._idle.start(self)
        if sent != size:
            self._queue_rest(data, sent, size)

    def writelines(self, chunks):
        for chunk in chunks:
            self.write(chunk)

    def _send_bytes(self, data):
        """Bytes for the socket, in order: sent at once where possible, else queued."""
        cdef Py_buffer view
        cdef ssize_t sent
        cdef Py_ssize_t size
        cdef int code
        if self._state == CLOSED:
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        size = view.len
        if not size:
            PyBuffer_Release(&view)
            return
        if self._queue:
            PyBuffer_Release(&view)
            self._queue.append(data if type(data) is bytes else bytes(data))
            self._buffered += size
            self._check_high_water()
            return
        sent = portside_send(self._fd, view.buf, <size_t>size)
        PyBuffer_Release(&view)
        if sent < 0:
            code = errno
            if code != EAGAIN and code != EINTR:
                self._failed(os_error(code), WRITE_ORIGIN)
                return
            sent = 0
        self._count_sent(sent)
        if sent != size:
            self._queue_rest(data, sent, size)

    def _queue_rest(self, data, Py_ssize_t sent, Py_ssize_t size):
        """Keep what the kernel did not take, copied (``data`` may be a lent buffer)."""
        cdef Py_buffer view
        if self._queue is None:
            self._queue = deque()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._queue.append(PyBytes_FromStringAndSize(<char *>view.buf + sent, size - sent))
        finally:
            PyBuffer_Release(&view)
        self._buffered += size - sent
        self._set_writing_c(True)
        self._check_high_water()

    def handle_write(self):
        self._write_ready()

    cdef int _write_ready(self) except -1:
        cdef iovec vectors[SENDMSG_BATCH]
        cdef Py_ssize_t count, i, size
        cdef ssize_t sent
        cdef int code
        cdef object queue = self._queue
        cdef bytes head
        if self._state == CLOSED or not queue:
            return 0
        count = min(len(queue), SENDMSG_BATCH)
        for i in range(count):
            head = <bytes>queue[i]
            vectors[i].iov_base = PyBytes_AS_STRING(head)
            vectors[i].iov_len = PyBytes_GET_SIZE(head)
        head = None
        sent = writev(self._fd, vectors, <int>count)
        if sent < 0:
            code = errno
            if code != EAGAIN and code != EINTR:
                self._failed(os_error(code), WRITE_ORIGIN)
            return 0
        self._count_sent(sent)
        self._buffered -= sent
        if sent and self.listener.write_tracker is not None:
            self.listener.write_tracker.start(self)  # progress: the peer is reading
        while sent:
            head = <bytes>queue[0]
            size = PyBytes_GET_SIZE(head)
            if sent >= size:
                queue.popleft()
                sent -= size
            else:
                queue[0] = head[sent:]
                sent = 0
        if self._has(F_FLOW_PAUSED) and (self._buffered
                                         <= self.listener.config.write_low_water):
            self._flags &= ~F_FLOW_PAUSED
            self._update_reading_c()
            self._call_c("resume_writing", HANDLER_RESUME)
        if not queue:
            self._set_writing_c(False)
            if self._state == CLOSING:
                self._send_fin_c()
            elif self._state == OPEN:
                if self._flags & F_WRITE_EOF:
                    (<object>self)._shutdown_write()  # the half-close write_eof asked for
                if self._state == OPEN:
                    self._call_c("write_drained", HANDLER_DRAINED)
        return 0

    cdef inline void _count_sent(self, Py_ssize_t sent):
        self.bytes_out += sent
        if sent and self._idle is not None:
            self._idle.start(self)

    def _set_writing(self, bint writing):
        self._set_writing_c(writing)

    cdef int _set_writing_c(self, bint writing) except -1:
        # Closed (a callback may close it just before): see connection.py.
        if writing != self._has(F_WRITING) and self._state != CLOSED:
            self._put(F_WRITING, writing)
            self._reactor_modify(self._wants_read_c(), writing)
            # The write timeout runs while bytes wait for the peer to take them.
            tracker = self.listener.write_tracker
            if tracker is not None:
                if writing:
                    tracker.start(self)
                else:
                    tracker.stop(self)
        return 0

    def _wants_read(self):
        return self._wants_read_c()

    cdef inline bint _wants_read_c(self) noexcept:
        if self._state == LINGERING:
            return True
        return (self._state <= OPEN and self._flags & (
            F_READING | F_USER_PAUSED | F_FLOW_PAUSED | F_HELD) == F_READING)

    def _update_reading(self):
        self._update_reading_c()

    cdef int _update_reading_c(self) except -1:
        if self._state != CLOSED:
            self._reactor_modify(self._wants_read_c(), self._has(F_WRITING))
        return 0

    cdef int _reactor_modify(self, bint readable, bint writable) except -1:
        reactor = self._core.reactor
        if type(reactor) is Loop:
            (<Loop>reactor)._modify(self._fd, readable, writable)
        else:
            reactor.modify(self._fd, readable, writable)
        return 0

    # -- closing -----------------------------------------------------------------------------

    def close(self):
        """Graceful close: send every queued byte, then FIN; ``connection_closed`` follows."""
        self._close_c(CLOSED_REASON)

    def close_for(self, reason):
        """Graceful close on the server's behalf (shutdown, timeouts), recording ``reason``."""
        self._close_c(reason)

    cdef int _close_c(self, reason) except -1:
        self._begin_close_c(reason)
        return 0

    def abort(self):
        """Abortive close: drop unsent bytes and reset the connection (RST) now."""
        if self._state != CLOSED:
            self._abort_c(ABORTED_REASON)

    def abort_for(self, reason):
        if self._state != CLOSED:
            self._abort_c(reason)

    def _begin_close(self, reason):
        self._begin_close_c(reason)

    cdef int _begin_close_c(self, reason) except -1:
        cdef bint was_open
        if self._state >= CLOSING:
            return 0
        if self._corked is not None:
            self.uncork()  # what was written before close() is still sent
            if self._state >= CLOSING:  # the send failed: the connection has ended
                return 0
        was_open = self._state == OPEN
        # CLOSING before the close_notify goes out, as in connection.py: sending it may end
        # the connection here, and nothing below may bring it back to life.
        self._set_reason_c(reason)
        self._state = CLOSING
        if was_open and self._extras is not None and self._extras.tls is not None:
            self._extras.tls.close_notify(self)  # before the FIN, so the peer can tell an end
            if self._state != CLOSING:
                return 0
        if self._queue:
            self._update_reading_c()  # stop reading while the queue drains
            (<object>self)._arm_flush_deadline()  # connection.py: a flush that never ends
        else:
            self._send_fin_c()
        return 0

    def _send_fin(self):
        self._send_fin_c()

    cdef int _send_fin_c(self) except -1:
        if self._flags & F_EOF:  # the peer has sent its FIN already: nothing left to wait for
            self._finalize_c()
            return 0
        if c_shutdown(self._fd, 1) < 0:  # SHUT_WR
            self._finalize_c()
            return 0
        self._state = LINGERING
        self._flags &= ~F_READING
        self._update_reading_c()
        if self._extras is not None and self._extras.linger_timer is not None:
            self._extras.linger_timer.cancel()  # the flush deadline (_arm_flush_deadline)
        self._more().linger_timer = self._core.reactor.call_later(
            self._core.config.linger_timeout, self._finalize)
        return 0

    def _abort(self, reason):
        self._abort_c(reason)

    def _set_reason(self, reason):
        """Record why the connection ends, unless a reason is recorded already: the first
        wins (see connection.py). Returns the reason in force."""
        self._set_reason_c(reason)
        return self.close_reason

    cdef inline void _set_reason_c(self, reason):
        if self.close_reason is None:
            self.close_reason = reason

    cdef int _abort_c(self, reason) except -1:
        self._set_reason_c(reason)
        if self._fd >= 0 and self._state != CLOSED:
            c_setsockopt(self._fd, SOL_SOCKET_, SO_LINGER_, PyBytes_AS_STRING(LINGER_RST),
                         <socklen_t>PyBytes_GET_SIZE(LINGER_RST))
        self._finalize_c()
        return 0

    def _socket_failed(self, exc, origin=READ_ORIGIN):
        self._failed(exc, origin)

    cdef int _failed(self, exc, origin) except -1:
        if isinstance(exc, TimeoutError):  # keepalive or tcp_user_timeout: the peer is gone
            (<object>self)._peer_timed_out()
            return 0
        if isinstance(exc, RESET_ERRORS):
            first = self.close_reason is None
            if self._state != CLOSED:
                self._set_reason_c(RESET_REASON)
            if first and self._state == OPEN:
                # Reason set first: a write inside the callback fails again, quietly.
                self._call_c("connection_reset", HANDLER_RESET)
            self._finalize_c()
            return 0
        if self._state != CLOSED:
            self._set_reason_c(SOCKET_ERROR_REASON)
            if self._flags & F_ESTABLISHED:
                self._core.report_error(self, exc, origin)
            self._finalize_c()
        return 0

    def _handler_failed(self, exc, origin=CALLBACK_ORIGIN):
        self._core.report_error(self, exc, origin)
        if self._state != CLOSED:
            self._abort_c(HANDLER_ERROR_REASON)

    def _finalize(self):
        """The single exit: release the socket and tell the handler, exactly once."""
        self._finalize_c()

    cdef int _finalize_c(self) except -1:
        if self._state == CLOSED:
            return 0
        self._state = CLOSED
        if self._fd < 0:  # closed and counted already: see connection.py
            self._core.finished_twice(self)
            return 0
        self._set_reason_c(CLOSED_REASON)
        if self._extras is not None and self._extras.linger_timer is not None:
            self._extras.linger_timer.cancel()
            self._extras.linger_timer = None
        core = self._core
        reactor = (<CoreBase>core).reactor if isinstance(core, CoreBase) else core.reactor
        if type(reactor) is Loop:
            (<Loop>reactor)._unregister(self._fd, True)
        else:
            reactor.unregister(self._fd, closing=True)
        if self._extras is not None and self._extras.sock is not None:
            self._extras.sock.close()
            self._extras.sock = None
        else:
            c_close(self._fd)
        if self._queue is not None:
            self._queue.clear()
        self._buffered = 0
        listener = self.listener
        if isinstance(listener, ListenerBase):
            (<ListenerBase>listener)._connection_finished(self, not self._has(F_ESTABLISHED))
        else:
            listener.connection_finished(self, was_pending=not self._has(F_ESTABLISHED))
        if not runs_default(self._handler, "connection_closed", HANDLER_CLOSED):
            try:
                self._handler.connection_closed(self, self.close_reason)
            except Exception as exc:
                core.report_error(self, exc)
        if self._extras is not None:  # not for the connection this object serves next
            self._extras.receiver = None
            self._extras.tls = None
        self._fd = -1  # closed: no later call can reach the number, which the kernel reuses
        if isinstance(core, CoreBase):
            (<CoreBase>core)._connection_finished(self)
        else:
            core.connection_finished(self)
        return 0

    def _call(self, str callback):
        self._call_c(callback, CALLBACK_DEFAULTS.get(callback))

    cdef int _call_c(self, str callback, default) except -1:
        """Run a handler callback, or what Handler's ``default`` would do, inline."""
        if default is not None and runs_default(self._handler, callback, default):
            if default is HANDLER_EOF:
                self._close_c(CLOSED_REASON)
            return 0
        try:
            getattr(self._handler, callback)(self)
        except Exception as exc:
            self._handler_failed(exc)
        return 0


# -- the accept loop (listener.py) -------------------------------------------------------------


cdef class ListenerBase:
    """The accept loop of ``listener.Listener``, and its per-connection bookkeeping."""

    cdef public object _core
    cdef public bint _closed
    cdef public Py_ssize_t pending_count
    cdef public Py_ssize_t active_count
    cdef public Py_ssize_t accepted
    cdef public Py_ssize_t accept_errors
    cdef public Py_ssize_t closed_count
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public bint _at_ceiling
    cdef public object config
    cdef public int fd
    cdef public bint is_tcp
    cdef public bint starts_pending
    cdef public bint data_first
    cdef public object proxy_protocol
    cdef public object idle_tracker
    cdef public object first_data
    cdef public object trackers
    cdef public dict closed_by_reason
    cdef public Py_ssize_t _max_connections
    cdef public Py_ssize_t peak_connections
    cdef public object silence
    cdef public object trusted
    cdef public list ttfb_buckets
    cdef public double ttfb_sum
    cdef public int _family
    cdef public object admission
    cdef public bint _admit_at_accept
    cdef public object handler  # what serves this listener's connections (Listener.attach)
    cdef public bint nodelay
    cdef public object socket_options
    cdef public object _socket_hook
    cdef public bint _probing
    # socket_options as C arrays, made at the first accept (the reference's tuple of
    # (level, name, value)); at the defaults there are none, so an accept costs no more.
    cdef int _option_count
    cdef int _option_level[8]
    cdef int _option_name[8]
    cdef int _option_value[8]

    def __cinit__(self):
        self._option_count = -1  # socket_options are loaded at the first accept

    def handle_read(self):
        cdef Py_ssize_t limit = self._max_connections
        cdef Py_ssize_t batch = self.config.accept_batch
        cdef Py_ssize_t i
        cdef int fd, code
        cdef sockaddr_storage addr
        cdef socklen_t length
        if self._option_count < 0:
            self._load_options()
        for i in range(batch):
            if self._closed:
                return  # a handler shut the server down from connection_made
            if self.pending_count + self.active_count >= limit:
                self._reach_ceiling()
                if self._at_ceiling:
                    return
            length = sizeof(addr)
            fd = accept4(self.fd, <sockaddr *>&addr, &length, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                code = errno
                if code == EAGAIN or code == EINTR:
                    return
                self.accept_errors += 1
                if skip_errno(code):
                    continue
                if capacity_errno(code):
                    self._back_off(os_error(code))
                    return
                self._accept_broken(os_error(code))  # logs, stops watching, raises
                return
            if self.trusted is not None:  # a PROXY-protocol listener: only balancers may speak
                peer = address_from(<sockaddr *>&addr, length)
                if not trusted_peer(peer, self.trusted):
                    self._refuse(FdSocket(fd), peer)
                    continue
            if self._admit_at_accept and not self._check_client_c(fd, <sockaddr *>&addr, length):
                continue
            self._admit_fd(fd, <sockaddr *>&addr, length)

    def handle_write(self):  # listeners are never watched for writing
        pass

    cdef int _check_client_c(self, int fd, const sockaddr *addr, socklen_t length) except -1:
        """``Listener._check_client``: the per-client limits at accept; 1 if admitted, else 0
        and the connection is refused (reset)."""
        packed = packed_address(addr)
        if packed is None:
            return 1
        refusal = self.admission.admit(fd, packed)
        if refusal is None:
            return 1
        self._refuse_client(FdSocket(fd), address_from(addr, length), refusal)
        return 0

    cdef int _load_options(self) except -1:
        options = self.socket_options or ()
        if len(options) > 8:
            raise ValueError("more socket options than the compiled accept path holds")
        self._option_count = 0
        for level, name, value in options:
            self._option_level[self._option_count] = level
            self._option_name[self._option_count] = name
            self._option_value[self._option_count] = value
            self._option_count += 1
        return 0

    cdef int _admit_fd(self, int fd, const sockaddr *addr, socklen_t length) except -1:
        cdef int one = 1
        cdef int i
        cdef ConnectionBase conn
        core = self._core
        if self.nodelay:
            # Request/response protocols must not wait 40 ms for Nagle's algorithm.
            c_setsockopt(fd, IPPROTO_TCP_, TCP_NODELAY, &one, sizeof(int))
        for i in range(self._option_count):  # as listener.py: checked values, errors ignored
            c_setsockopt(fd, self._option_level[i], self._option_name[i],
                         &self._option_value[i], sizeof(int))
        if self._socket_hook is not None:
            if not self._run_socket_hook(fd, address_from(addr, length)):
                return 0  # the hook raised: reset, counted and reported there
        self.accepted += 1
        conn = (<CoreBase>core)._new_connection()
        conn._attach_accepted(self, fd, addr, length, self.starts_pending)
        if self.idle_tracker is not None:
            self.idle_tracker.start(conn)
        if self.starts_pending:
            self.pending_count += 1
            self.first_data.start(conn)
        else:
            self.active_count += 1
            conn._establish(None)
        if self.pending_count + self.active_count > self.peak_connections:
            self.peak_connections = self.pending_count + self.active_count
        return 0

    def record_first_byte(self, double seconds):
        """A connection's first byte came ``seconds`` after its accept (a histogram)."""
        self._record_first_byte(seconds)

    cdef int _record_first_byte(self, double seconds) except -1:
        cdef Py_ssize_t bucket = 0
        cdef tuple bounds = TTFB_BUCKETS
        while bucket < len(bounds) - 1 and seconds > <double>bounds[bucket]:
            bucket += 1  # bisect_left over a dozen bounds
        self.ttfb_sum += seconds
        self.ttfb_buckets[bucket] += 1
        return 0

    cdef int _became_active(self, conn) except -1:
        """A pending data-first connection sent its first bytes."""
        self.first_data.stop(conn)
        self.pending_count -= 1
        self.active_count += 1
        return 0

    def became_active(self, conn):
        self._became_active(conn)

    def connection_finished(self, conn, bint was_pending):
        self._connection_finished(conn, was_pending)

    cdef int _connection_finished(self, conn, bint was_pending) except -1:
        # Byte counts live on the connections while they are open (one add per read, not two)
        # and are folded into the listener's when they close.
        if isinstance(conn, ConnectionBase):
            self.bytes_in += (<ConnectionBase>conn).bytes_in
            self.bytes_out += (<ConnectionBase>conn).bytes_out
        else:
            self.bytes_in += conn.bytes_in
            self.bytes_out += conn.bytes_out
        for tracker in self.trackers:
            if type(tracker) is TimeoutTracker:
                (<TimeoutTracker>tracker).queue._discard(conn)
            else:
                tracker.stop(conn)
        if self.admission is not None:
            self.admission.release(conn._fd)
        if was_pending:
            self.pending_count -= 1
        else:
            self.active_count -= 1
        self.closed_count += 1
        count_close(self.closed_by_reason, conn.close_reason)  # the one tally (states.py)
        if (self._at_ceiling or self._probing) and (self.pending_count + self.active_count
                                                    < self._max_connections):
            self._at_ceiling = self._probing = False
            self._update_watch()
        return 0
