# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=False
"""The compiled twin of ``resp.py``'s ``RespFramer``, and a fast path for a server's commonest
commands. Sans-IO: bytes in, commands (or reply bytes) out.

Theory of operation. ``RespFramer`` here is the pure class line for line (``split`` and
``_parse`` keep their names, state and error texts; see ``resp.py`` for the design), on a C
pointer instead of ``bytes.find``, with ``Framer.feed``'s buffering folded in. The pure one is
the reference: the property tests run against both, and a differential test feeds both the
same streams cut at the same places.

``serve`` is ``feed`` for a framer that answers some commands itself: each whole command is
handed, as it is parsed (as spans of the read, where it is plain), to ``_answer``, the hook a
compiled subclass overrides (``_resp.pxd`` is its C interface; the RESP example's
``examples/_resp_store.pyx`` is one), which appends its reply to one output buffer. Here it
answers nothing. At the first command it does not take (or an oversized output) the read stops
and hands that command back; the caller runs it its own way and calls ``resume`` (or ``rest``,
for the remaining commands as lists) with the same data. So a pipelined read of answered
commands costs one call and one reply buffer, and everything else keeps the caller's
semantics, in order.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcpy

from portside.errors import ProtocolError
from portside.protocols.framing import Framer
from portside.text import printable

cdef Py_ssize_t KIB = 1024
cdef Py_ssize_t MIB = 1024 * KIB
cdef Py_ssize_t LINE_MAX = 32  # resp.py's _LINE_MAX
cdef Py_ssize_t NO_COMMAND = -1
cdef Py_ssize_t HUGE = 1 << 62  # stands for any length past every cap (Python's int is unbounded)
cdef Py_ssize_t OUT_KEEP = 64 * 1024  # a reply buffer larger than this is freed after use
cdef char *spare = NULL  # the reply buffer between serve() calls, shared by every framer
cdef Py_ssize_t spare_cap = 0

cdef enum:
    SPANS = 8  # arguments of a command the fast path looks at, at most

# ``Mode``, the class's fields and its C methods are declared in _resp.pxd.

cdef inline Py_ssize_t find_crlf(const unsigned char *raw, Py_ssize_t at,
                                 Py_ssize_t stop) noexcept:
    """``raw.find(b"\\r\\n", at, stop)``, for the short spans of a length line (a loop beats
    a call to memchr there)."""
    stop -= 1
    while at < stop:
        if raw[at] == 13 and raw[at + 1] == 10:
            return at
        at += 1
    return -1


cdef Py_ssize_t parse_length(const unsigned char *raw, Py_ssize_t size, bint *ok) except? -1:
    """``int(raw[:size])`` as resp.py reads a length, clamped to +-HUGE; ``ok`` is False where
    int() raises ValueError. Plain digits are read here, anything else by int() itself."""
    cdef Py_ssize_t i = 0, value = 0
    cdef bint negative = False
    ok[0] = True
    if 0 < size <= 18:  # 18 characters cannot overflow
        if raw[0] == 45:  # '-'
            negative = True
            i = 1
        if i < size:
            while i < size and 48 <= raw[i] <= 57:
                value = value * 10 + (raw[i] - 48)
                i += 1
            if i == size:
                return -value if negative else value
    try:
        number = int(PyBytes_FromStringAndSize(<const char *>raw, size))
    except ValueError:
        ok[0] = False
        return 0
    if number > HUGE:
        return HUGE
    if number < -HUGE:
        return -HUGE
    return number


cdef inline bint is_space(unsigned char c) noexcept:
    # bytes.split()'s whitespace: space, \t, \n, \v, \f, \r
    return c == 32 or 9 <= c <= 13


cdef list split_words(const unsigned char *raw, Py_ssize_t size):
    """``raw[:size].split()``."""
    cdef list words = []
    cdef Py_ssize_t at = 0, start
    while at < size:
        while at < size and is_space(raw[at]):
            at += 1
        if at == size:
            break
        start = at
        while at < size and not is_space(raw[at]):
            at += 1
        words.append(PyBytes_FromStringAndSize(<const char *>raw + start, at - start))
    return words


cdef inline Py_ssize_t plain_length(const unsigned char *raw, Py_ssize_t size) noexcept:
    """A length of 1 to 18 ASCII digits, or -1 for anything else (which the general parser
    reads, with int())."""
    cdef Py_ssize_t i, value = 0
    if not 0 < size <= 18:
        return -1
    for i in range(size):
        if not 48 <= raw[i] <= 57:
            return -1
        value = value * 10 + (raw[i] - 48)
    return value


cdef class RespFramer:
    """Splits a RESP request stream into commands (lists of bulk-string arguments); the
    compiled twin of ``resp.RespFramer``, with the same limits and errors. Its fields and C
    methods are declared in ``_resp.pxd``."""

    def __init__(self, Py_ssize_t max_bulk=8 * MIB, Py_ssize_t max_arguments=64 * KIB,
                 Py_ssize_t max_request=32 * MIB, Py_ssize_t max_inline=64 * KIB):
        for name, value in (("max_bulk", max_bulk), ("max_arguments", max_arguments),
                            ("max_request", max_request), ("max_inline", max_inline)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1")
        self.max_bulk = max_bulk
        self.max_arguments = max_arguments
        self.max_request = max_request
        self.max_inline = max_inline
        self.need = 0
        self.error = None
        self._pending = bytearray()
        self._args = []
        self._left = NO_COMMAND
        self._bulk = -1
        self._taken = 0
        self._searched = 0
        self._read_at = -1

    def __dealloc__(self):
        free(self._out)

    # -- Public API ------------------------------------------------------------------------------

    @property
    def buffered(self):
        return PyByteArray_GET_SIZE(self._pending) + self._taken

    @property
    def reading(self):
        """True while a read that ``serve`` stopped has commands left (``resume`` or ``rest``)."""
        return self._read_at >= 0

    def feed(self, data):
        """As ``Framer.feed``: the commands ``data`` completes, in order."""
        if self.error is not None:
            raise self.error
        cdef list messages = []
        self._no_read()
        self._mode = LIST
        self._sink = messages
        self._run(data, True)
        self._sink = None
        if self.error is not None and not messages:
            raise self.error
        return messages

    def split(self, data, list messages):
        """As ``RespFramer.split``: parse ``data`` from the framer's state; the bytes used."""
        cdef Py_buffer view
        self._mode = LIST
        self._sink = messages
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._split(<const unsigned char *>view.buf, view.len, 0)
        finally:
            PyBuffer_Release(&view)
            self._sink = None

    def serve(self, data, Py_ssize_t limit):
        """Begin a read: answer the commands ``_answer`` takes (none, here: a subclass's),
        until one it does not take, which it hands back, or more than ``limit`` reply bytes.
        Returns the replies and that command (or None). A protocol error sets ``error``."""
        if self.error is not None:
            raise self.error
        self._no_read()
        return self._serve(data, limit, True)

    def resume(self, data, Py_ssize_t limit):
        """Go on with the read ``serve`` stopped (``data`` is the same bytes)."""
        if self._read_at < 0:
            raise RuntimeError("no read in progress")
        return self._serve(data, limit, False)

    def rest(self, data):
        """The remaining whole commands of the read ``serve`` stopped, as ``feed`` gives them;
        the read ends."""
        if self._read_at < 0:
            raise RuntimeError("no read in progress")
        cdef list messages = []
        self._mode = LIST
        self._sink = messages
        self._run(data, False)
        self._sink = None
        return messages

    def check_pending(self, Py_ssize_t size):
        if self._taken + size > self.max_request:
            raise ProtocolError("request too large")

    def eof(self):
        if self.error is not None:
            raise self.error
        if self.buffered:
            raise ProtocolError(f"stream ended inside a message ({self.buffered} bytes)")
        if self._left != NO_COMMAND:
            raise ProtocolError("stream ended inside a command")

    def detach(self, message):
        return message  # commands are lists of bytes, never views

    def encode(self, message):
        return [message]  # replies are encoded whole by the encode_* functions

    # -- the read: Framer.feed's buffering -------------------------------------------------------

    cdef int _no_read(self) except -1:
        if self._read_at >= 0:
            raise RuntimeError("the read serve() stopped is not finished (resume or rest)")
        return 0

    cdef tuple _serve(self, data, Py_ssize_t limit, bint first):
        global spare, spare_cap
        self._mode = SERVE
        self._out_limit = limit
        self._stopped = None
        # The process's reply buffer, for this call only: an idle connection keeps none. (A
        # call nested in this one, were there any, would find it taken and make its own.)
        self._out, self._out_cap, self._out_len = spare, spare_cap, 0
        spare, spare_cap = NULL, 0
        try:
            self._run(data, first)
            replies = PyBytes_FromStringAndSize(self._out, self._out_len) if self._out_len \
                else b""
        finally:
            if spare == NULL and self._out_cap <= OUT_KEEP:
                spare, spare_cap = self._out, self._out_cap
            else:  # a large reply's buffer is not kept
                free(self._out)
            self._out, self._out_cap = NULL, 0
        command, self._stopped = self._stopped, None
        return replies, command

    cdef int _run(self, data, bint first) except -1:
        """Framer.feed: parse the read (from where it stopped), and once it is used up keep its
        tail and check what is buffered."""
        cdef bytearray pending = self._pending
        cdef Py_buffer view
        cdef Py_ssize_t used, total, size
        if first:
            self._read_at = 0
            self._read_pending = PyByteArray_GET_SIZE(pending) > 0
            if self._read_pending:
                pending += data
        self._stop = False
        PyObject_GetBuffer(pending if self._read_pending else data, &view, PyBUF_SIMPLE)
        try:
            total = view.len
            if first and total < self.need:
                used = 0
            else:
                try:
                    used = self._split(<const unsigned char *>view.buf, total, self._read_at)
                except ProtocolError as exc:
                    # Without its traceback, as Framer._split_into keeps it.
                    self.error = exc.with_traceback(None)
                    used = total
            if self._stop and self.error is None and used < total:
                self._read_at = used
                return 0  # the read goes on with resume() or rest()
            self._read_at = -1
            if not self._read_pending and used < total and self.error is None:
                size = total - used  # the tail: the start of a command still arriving
                PyByteArray_Resize(pending, size)
                memcpy(PyByteArray_AS_STRING(pending), <char *>view.buf + used, size)
        finally:
            PyBuffer_Release(&view)
        if self._read_pending:
            del pending[:used]  # O(1): a bytearray drops its head by moving its start
        if self.error is None and PyByteArray_GET_SIZE(pending):
            try:
                self.check_pending(PyByteArray_GET_SIZE(pending))
            except ProtocolError as exc:
                self.error = exc
        if self.error is not None:
            del pending[:]  # nothing after a bad frame can be trusted
        return 0

    # -- parsing: resp.py's split and _parse -----------------------------------------------------

    cdef Py_ssize_t _split(self, const unsigned char *data, Py_ssize_t total,
                           Py_ssize_t at) except -1:
        """resp.py's ``split`` from ``at`` (0, or where a stopped read resumes: always
        between commands); the bytes used."""
        cdef Py_ssize_t size
        cdef list args
        if at == 0:
            if self._left != NO_COMMAND:
                if self._bulk >= 0:
                    # _run calls only once the body and its CRLF are here (``need``), but
                    # split() is public, and ``need`` writable: check, never read past.
                    size = self._bulk
                    if total < size + 2:
                        return 0
                    if data[size] != 13 or data[size + 1] != 10:
                        raise ProtocolError("bulk string not followed by CRLF")
                    self._args.append(PyBytes_FromStringAndSize(<const char *>data, size))
                    at = size + 2
                    self._taken += at
                    self._bulk = -1
                    self.need = 0
                    self._left -= 1
                    if not self._left:
                        args = self._args
                        self._args = []
                        self._left = NO_COMMAND
                        self._taken = 0
                        if self._deliver(args):
                            return at
            elif self._searched:
                # An inline line is arriving in pieces: look for its end only in the new bytes.
                if (self._searched >= total  # a shorter input than before: no new bytes
                        or memchr(data + self._searched, 10, total - self._searched) == NULL):
                    self._searched = total
                    if total > self.max_inline:
                        raise ProtocolError("too big inline request")
                    return 0
                self._searched = 0
        if at == total:
            return at
        return self._parse(data, total, at)

    cdef Py_ssize_t _parse(self, const unsigned char *raw, Py_ssize_t total,
                           Py_ssize_t at) except -1:
        """resp.py's ``_parse`` (the general parser) from ``at``; the bytes used."""
        cdef Py_ssize_t left = self._left
        cdef list args = self._args
        cdef Py_ssize_t max_bulk = self.max_bulk
        cdef Py_ssize_t end, count, size, body, command_start = at, stop
        cdef const unsigned char *found
        cdef bint ok
        cdef Py_ssize_t answered
        try:
            while at < total:
                if left == NO_COMMAND:
                    if raw[at] != 42:  # not '*': an inline command
                        stop = total if total - at <= self.max_inline else at + self.max_inline + 1
                        found = <const unsigned char *>memchr(raw + at, 10, stop - at)
                        if found == NULL:
                            if total - at > self.max_inline:
                                raise ProtocolError("too big inline request")
                            self._searched = total - at
                            return at
                        end = found - raw
                        command_start = at
                        at = end + 1
                        if (memchr(raw + command_start, 34, end - command_start) != NULL
                                or memchr(raw + command_start, 39, end - command_start) != NULL):
                            raise ProtocolError("quoted inline arguments are not supported")
                        if self._mode == SERVE:
                            answered = self._inline(raw + command_start, end - command_start)
                            if answered == 0:
                                continue
                            if answered > 0:
                                if self._out_len > self._out_limit:
                                    self._stop = True
                                    return at
                                continue
                        inline = split_words(raw + command_start, end - command_start)
                        if inline and self._deliver(inline):
                            return at
                        continue
                    if self._mode == SERVE:
                        end = self._whole(raw, total, at)
                        if end >= 0:
                            at = end
                            if self._out_len > self._out_limit:
                                self._stop = True
                                return at
                            continue
                    end = find_crlf(raw, at, min(at + LINE_MAX, total))
                    if end < 0:
                        if total - at >= LINE_MAX:
                            raise ProtocolError("too big mbulk count string")
                        return at
                    count = parse_length(raw + at + 1, end - at - 1, &ok)
                    if not ok or count > self.max_arguments:
                        raise ProtocolError("invalid multibulk length")
                    command_start = at
                    at = end + 2
                    if count <= 0:
                        continue  # as Redis: an empty array is no command
                    left = count
                    self._taken = 0
                else:
                    command_start = at  # resuming a command across reads
                # The arguments: "$<size>\r\n<bytes>\r\n" each.
                while left:
                    if at >= total:
                        break
                    if raw[at] != 36:  # '$'
                        raise ProtocolError(f"expected '$', got '{printable(chr(raw[at]))}'")
                    end = find_crlf(raw, at, min(at + LINE_MAX, total))
                    if end < 0:
                        if total - at >= LINE_MAX:
                            raise ProtocolError("too big bulk count string")
                        break
                    size = parse_length(raw + at + 1, end - at - 1, &ok)
                    if not ok or not 0 <= size <= max_bulk:
                        raise ProtocolError("invalid bulk length")
                    body = end + 2
                    if body + size + 2 > total:
                        # The body is still arriving: consume the header, wait for the rest.
                        self._bulk = size
                        self.need = size + 2
                        at = body
                        break
                    if raw[body + size] != 13 or raw[body + size + 1] != 10:
                        raise ProtocolError("bulk string not followed by CRLF")
                    args.append(PyBytes_FromStringAndSize(<const char *>raw + body, size))
                    at = body + size + 2
                    left -= 1
                if left:
                    self._taken += at - command_start
                    if self._taken + max(self._bulk + 2, 0) > self.max_request:
                        raise ProtocolError("request too large")
                    return at
                if self._taken + at - command_start > self.max_request:
                    raise ProtocolError("request too large")
                command = args
                args = self._args = []
                left = NO_COMMAND
                self._taken = 0
                if self._deliver(command):
                    return at
            return at
        finally:
            self._left = left

    cdef bint _deliver(self, list command) except -1:
        """A whole command: to the list, or answered; True when the read must stop here."""
        if self._mode == LIST:
            self._sink.append(command)
            return False
        if self._execute(command):
            if self._out_len > self._out_limit:
                self._stop = True  # the caller sends these before the read goes on
            return self._stop
        self._stopped = command
        self._stop = True
        return True

    # -- the fast path: commands given to _answer as spans -----------------------------------

    cdef bint _execute(self, list command) except -1:
        """``_answer`` for a command parsed into a list (one that spanned reads)."""
        cdef const char *arg[SPANS]
        cdef Py_ssize_t size[SPANS]
        cdef Py_ssize_t i, count = PyList_GET_SIZE(command)
        if count > SPANS:
            return False
        for i in range(count):
            item = <object>PyList_GET_ITEM(command, i)
            arg[i] = PyBytes_AS_STRING(item)
            size[i] = PyBytes_GET_SIZE(item)
        return self._answer(arg, size, count)

    cdef Py_ssize_t _whole(self, const unsigned char *raw, Py_ssize_t total,
                           Py_ssize_t at) except -2:
        """The plain, whole command at ``at`` (``*N`` and ``$N`` headers of digits only,
        within every cap), answered from spans of ``raw`` without making a list; the position
        after it, or -1 where it is anything else, for the general parser to take as usual."""
        cdef const char *arg[SPANS]
        cdef Py_ssize_t size[SPANS]
        cdef Py_ssize_t count, i, end, length, body, start = at
        end = find_crlf(raw, at, min(at + LINE_MAX, total))
        if end < 0:
            return -1
        count = plain_length(raw + at + 1, end - at - 1)
        if not 0 < count <= SPANS or count > self.max_arguments:
            return -1
        at = end + 2
        for i in range(count):
            if at >= total or raw[at] != 36:
                return -1
            end = find_crlf(raw, at, min(at + LINE_MAX, total))
            if end < 0:
                return -1
            length = plain_length(raw + at + 1, end - at - 1)
            body = end + 2
            if (length < 0 or length > self.max_bulk or body + length + 2 > total
                    or raw[body + length] != 13 or raw[body + length + 1] != 10):
                return -1
            arg[i] = <const char *>raw + body
            size[i] = length
            at = body + length + 2
        if at - start > self.max_request or not self._answer(arg, size, count):
            return -1
        return at

    cdef Py_ssize_t _inline(self, const unsigned char *raw, Py_ssize_t size) except -2:
        """The words of an inline line (no quotes, checked), answered from spans: 1 if it
        was, 0 for an empty line, -1 for anything else."""
        cdef const char *arg[SPANS]
        cdef Py_ssize_t length[SPANS]
        cdef Py_ssize_t count = 0, at = 0, start
        while at < size:
            while at < size and is_space(raw[at]):
                at += 1
            if at == size:
                break
            start = at
            while at < size and not is_space(raw[at]):
                at += 1
            if count == SPANS:
                return -1
            arg[count] = <const char *>raw + start
            length[count] = at - start
            count += 1
        if not count:
            return 0
        return 1 if self._answer(arg, length, count) else -1

    cdef bint _answer(self, const char **arg, Py_ssize_t *size, Py_ssize_t count) except -1:
        """The hook: answer a command given as spans (appending the reply) and return True,
        or return False to hand it back. Here: False, always."""
        return False

    # -- the reply buffer ------------------------------------------------------------------------

    cdef int _reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t cap = self._out_cap or 4096
        cdef char *grown
        if self._out_len + more <= self._out_cap:
            return 0
        while cap < self._out_len + more:
            cap *= 2
        grown = <char *>realloc(self._out, cap)
        if grown == NULL:
            raise MemoryError()
        self._out = grown
        self._out_cap = cap
        return 0

    cdef int _append(self, const char *data, Py_ssize_t size) except -1:
        self._reserve(size)
        memcpy(self._out + self._out_len, data, size)
        self._out_len += size
        return 0

    cdef int _bulk_reply(self, const char *value, Py_ssize_t size) except -1:
        cdef char digits[24]
        cdef Py_ssize_t length = format_integer(size, digits)
        self._reserve(size + length + 5)
        self._append(b"$", 1)
        self._append(digits, length)
        self._append(b"\r\n", 2)
        self._append(value, size)
        self._append(b"\r\n", 2)
        return 0


cdef Py_ssize_t format_integer(long long value, char *out) noexcept:
    """``b"%d" % value`` into ``out`` (24 bytes); its length."""
    cdef char reverse[24]
    cdef Py_ssize_t n = 0, i
    cdef unsigned long long magnitude = <unsigned long long>value
    if value < 0:
        magnitude = <unsigned long long>0 - magnitude
    while True:
        reverse[n] = <char>(48 + magnitude % 10)
        n += 1
        magnitude //= 10
        if not magnitude:
            break
    i = 0
    if value < 0:
        out[0] = 45
        i = 1
    while n:
        n -= 1
        out[i] = reverse[n]
        i += 1
    return i


Framer.register(RespFramer)  # a Framer by its methods (an extension type cannot derive an ABC)
