# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=False
"""Portside's compiled engine: the hot paths of ``epoll.py``, ``buffers.py``, ``connection.py``
and ``listener.py``, in the same structure and under the same names.

Theory of operation. The pure-Python engine is the reference; this module holds only what runs
per event: the epoll loop (``Loop``, the twin of ``EpollReactor``), the buffer pool, and the
connection's read, write and flush paths and the listener's accept loop as extension-type bases
(``ConnectionBase``, ``ListenerBase``). ``compiled.py`` derives the engine's classes from these
bases and gives them every other method of the reference classes unchanged (closing, PROXY,
TLS, timeouts, statistics): those run once per connection, not once per read, and keeping one
copy of them keeps the two engines' behaviour the same by construction.

On the echo path a read is: ``epoll_wait`` -> ``recv`` into a pooled buffer -> one Python call
(``handler.data_received``) -> ``conn.write``, a C method that ``send``s at once when nothing is
queued. A handler is lent a view of the pooled buffer; a buffer some view still exports when the
callback returns is dropped from the pool, never reused, so a kept view never shows another
connection's bytes.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.ref cimport Py_INCREF, PyObject
from libc.errno cimport EAGAIN, EINTR, errno  # EWOULDBLOCK is EAGAIN on Linux
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport strerror

import heapq
import logging
import threading
from collections import deque

from portside.engine.connection import CloseReason
from portside.errors import ConnectionClosedError

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
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL

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

DEF MAX_EVENTS = 256
DEF SENDMSG_BATCH = 64  # buffers per writev; far below IOV_MAX (1024 on Linux)

# A registered descriptor's byte in Loop._masks.
DEF WANT_READ = 1
DEF WANT_WRITE = 2
DEF INTEREST = 3
DEF KNOWN = 0x80

# The connection states, as in connection.py's ``State``.
DEF PENDING = 0
DEF OPEN = 1
DEF CLOSING = 2
DEF LINGERING = 3
DEF CLOSED = 4

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
        cdef int interest = (WANT_READ if readable else 0) | (WANT_WRITE if writable else 0)
        if fd < 0:
            raise ValueError(f"bad file descriptor {fd}")
        self._grow(fd)
        if interest:
            self._ctl(EPOLL_CTL_ADD, fd, interest)
        if self._targets[fd] is None:
            self._count += 1
        self._targets[fd] = target
        self._masks[fd] = KNOWN | interest

    def modify(self, int fd, bint readable, bint writable):
        self._modify(fd, readable, writable)

    cdef int _modify(self, int fd, bint readable, bint writable) except -1:
        cdef int interest = (WANT_READ if readable else 0) | (WANT_WRITE if writable else 0)
        cdef int current
        if fd >= len(self._targets) or not self._masks[fd]:
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
        # Wake the loop even from its own thread: a signal handler runs there (see epoll.py).
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
    """The twin of buffers.BufferPool, over ``IOBuffer``s: same interface, same statistics."""

    cdef public Py_ssize_t buffer_size
    cdef public Py_ssize_t max_free
    cdef public list free
    cdef Py_ssize_t _created
    cdef Py_ssize_t _misses
    cdef public Py_ssize_t returned
    cdef Py_ssize_t _discarded

    def __init__(self, Py_ssize_t buffer_size, Py_ssize_t max_free, Py_ssize_t preallocate=1):
        self.buffer_size = buffer_size
        self.max_free = max_free
        self.free = [IOBuffer(buffer_size) for _ in range(min(preallocate, max_free))]
        self._created = len(self.free)
        self._misses = 0
        self.returned = 0
        self._discarded = 0

    cdef inline IOBuffer _acquire(self):
        cdef IOBuffer buffer
        if self.free:
            buffer = <IOBuffer>self.free.pop()
        else:
            self._misses += 1
            self._created += 1
            buffer = IOBuffer(self.buffer_size)
        buffer.length = buffer.size
        return buffer

    cdef inline void _give_back(self, IOBuffer buffer):
        self.returned += 1
        if buffer.exports:  # a view of it outlived its loan: never reuse it
            self._discarded += 1
            self._created -= 1
        elif len(self.free) < self.max_free:
            self.free.append(buffer)
        else:
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

        in_use = self._created - len(self.free)
        return PoolStatistics(self.buffer_size, len(self.free), in_use, self.max_free,
                              self.returned + in_use - self._misses, self._misses,
                              self._discarded)


# -- the connection's hot paths (connection.py) ------------------------------------------------


cdef class ConnectionBase:
    """Every field of ``connection.Connection``, and its per-read and per-write methods."""

    cdef public Py_ssize_t _buffered
    cdef public object _core
    cdef public object _corked
    cdef public bint _eof
    cdef public bint _established
    cdef public int _fd
    cdef public bint _flow_paused
    cdef public object _handler
    cdef public bint _held
    cdef public object _idle
    cdef public object _linger_timer
    cdef public object _pool
    cdef public object _preamble
    cdef public object _queue
    cdef public bint _reading
    cdef public object _sock
    cdef public int _state
    cdef public bint _user_paused
    cdef public bint _writing
    cdef public double accepted_at
    cdef public object balancer_address
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public object close_reason
    cdef public object framer
    cdef public object id
    cdef public object listener
    cdef public object peer_address
    cdef public object proxy
    cdef public object sequencer
    cdef public object user_data

    def __cinit__(self):
        self._state = CLOSED
        self._fd = -1

    cdef int _write_refused(self) except -1:
        # Writes after close() or abort() are the handler's bug; after the peer or an error
        # closed the connection they are dropped silently (as in Connection.write).
        if (self._state == PENDING or self.close_reason is CloseReason.CLOSED
                or self.close_reason is CloseReason.ABORTED):
            raise ConnectionClosedError(f"connection {self.id} is closed")
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
        if state >= CLOSING:
            if state == LINGERING:
                self._discard_until_eof()
            return 0
        pool = <BufferPool>self._pool
        buffer = pool._acquire()
        received = c_recv(self._fd, buffer.data, buffer.size, 0)
        if received < 0:
            code = errno
            pool._give_back(buffer)
            if code != EAGAIN and code != EINTR:
                self._socket_failed(os_error(code))
            return 0
        if received == 0:
            pool._give_back(buffer)
            self._peer_eof()
            return 0
        if not self.bytes_in:
            self.listener.record_first_byte(monotonic() - self.accepted_at)
        self.bytes_in += received
        if self._idle is not None:
            self._idle.start(self)
        buffer.length = received
        data = PyMemoryView_FromObject(buffer)
        try:
            if state == OPEN:
                self._handler.data_received(self, data)
            else:
                self._deliver(data, state)
        except Exception as exc:
            self._handler_failed(exc)
        finally:
            # A handler that kept ``data`` gets an error, not another peer's bytes; a slice or
            # export it kept holds an export of the buffer, which the pool then drops.
            try:
                data.release()
            except BufferError:
                pass
            data = None
            pool._give_back(buffer)
        return 0

    # -- writing ---------------------------------------------------------------------------------

    def write(self, data):
        """Queue ``data`` to be sent in order; never blocks (see ``Connection.write``)."""
        cdef Py_buffer view
        cdef ssize_t sent
        cdef Py_ssize_t size
        cdef int code
        if self._state != OPEN:
            self._write_refused()
            return
        if self._queue:
            self._send_bytes(data)
            return
        if self._corked is not None:
            self._corked.append(bytes(data))  # copied: ``data`` may be a lent buffer
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        size = view.len
        sent = c_send(self._fd, view.buf, <size_t>size, MSG_NOSIGNAL)
        PyBuffer_Release(&view)
        if sent < 0:
            code = errno
            if code != EAGAIN and code != EINTR:
                self._socket_failed(os_error(code))
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
        sent = c_send(self._fd, view.buf, <size_t>size, MSG_NOSIGNAL)
        PyBuffer_Release(&view)
        if sent < 0:
            code = errno
            if code != EAGAIN and code != EINTR:
                self._socket_failed(os_error(code))
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
        self._set_writing(True)
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
                self._socket_failed(os_error(code))
            return 0
        self._count_sent(sent)
        self._buffered -= sent
        if sent and self.listener.write is not None:
            self.listener.write.start(self)  # progress: the peer is reading
        while sent:
            head = <bytes>queue[0]
            size = PyBytes_GET_SIZE(head)
            if sent >= size:
                queue.popleft()
                sent -= size
            else:
                queue[0] = head[sent:]
                sent = 0
        if self._flow_paused and self._buffered <= self.listener.config.write_low_water:
            self._flow_paused = False
            self._update_reading()
            self._call("resume_writing")
        if not queue:
            self._set_writing(False)
            if self._state == CLOSING:
                self._send_fin()
            elif self._state == OPEN:
                self._call("write_drained")
        return 0

    cdef inline void _count_sent(self, Py_ssize_t sent):
        self.bytes_out += sent
        if sent and self._idle is not None:
            self._idle.start(self)

    def _set_writing(self, bint writing):
        if writing != self._writing:
            self._writing = writing
            self._reactor_modify(self._wants_read(), writing)
            # The write timeout runs while bytes wait for the peer to take them.
            tracker = self.listener.write
            if tracker is not None:
                if writing:
                    tracker.start(self)
                else:
                    tracker.stop(self)

    def _wants_read(self):
        if self._state == LINGERING:
            return True
        return (self._reading and self._state <= OPEN
                and not self._user_paused and not self._flow_paused and not self._held)

    def _update_reading(self):
        if self._state != CLOSED:
            self._reactor_modify(self._wants_read(), self._writing)

    cdef int _reactor_modify(self, bint readable, bint writable) except -1:
        reactor = self._core.reactor
        if type(reactor) is Loop:
            (<Loop>reactor)._modify(self._fd, readable, writable)
        else:
            reactor.modify(self._fd, readable, writable)
        return 0


# -- the accept loop (listener.py) -------------------------------------------------------------


cdef class ListenerBase:
    """The accept loop of ``listener.Listener``: the batch, the ceiling check and admission."""

    cdef public object _core
    cdef public bint _closed
    cdef public Py_ssize_t pending_count
    cdef public Py_ssize_t active_count
    cdef public Py_ssize_t accepted
    cdef public bint _at_ceiling
    cdef public object config

    def handle_read(self):
        cdef Py_ssize_t limit = self.config.max_connections
        cdef Py_ssize_t batch = self.config.accept_batch
        cdef Py_ssize_t i
        for i in range(batch):
            if self._closed:
                return  # a handler shut the server down from connection_made
            if self.pending_count + self.active_count >= limit:
                self._reach_ceiling()
                if self._at_ceiling:
                    return
            if not self._accept_one():
                return

    def handle_write(self):  # listeners are never watched for writing
        pass
