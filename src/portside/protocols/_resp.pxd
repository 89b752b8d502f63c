# The compiled RESP framer's C interface (``_resp.pyx``): what a compiled subclass cimports to
# answer some commands itself. ``serve`` hands each whole command, as spans of the read, to
# ``_answer``; a subclass that answers one appends its reply with ``_append``/``_bulk_reply``
# and returns True, or returns False to hand the command back to the caller. The RESP
# example's ``examples/_resp_store.pyx`` is one.

cdef enum Mode:
    LIST = 0  # whole commands go to a list (feed, split, rest)
    SERVE = 1  # whole commands go to _answer (serve, resume)


cdef Py_ssize_t format_integer(long long value, char *out) noexcept


cdef class RespFramer:
    cdef public Py_ssize_t max_bulk
    cdef public Py_ssize_t max_arguments
    cdef public Py_ssize_t max_request
    cdef public Py_ssize_t max_inline
    #: As ``Framer.need``: bytes the parser needs before it can make progress (0: any).
    cdef public Py_ssize_t need
    #: As ``Framer.error``: the first protocol error; once set, feed() raises it.
    cdef public object error
    cdef bytearray _pending
    # A command being received, as in resp.py.
    cdef list _args
    cdef Py_ssize_t _left
    cdef Py_ssize_t _bulk
    cdef Py_ssize_t _taken
    cdef Py_ssize_t _searched
    # The read in progress (serve stops mid-read): where it resumes, -1 when none is; whether
    # its bytes are in _pending (else they are the caller's data).
    cdef Py_ssize_t _read_at
    cdef bint _read_pending
    cdef Mode _mode
    cdef list _sink  # LIST: where whole commands go
    cdef bint _stop  # SERVE: stop at the current position
    cdef object _stopped  # SERVE: the command handed back, or None
    cdef Py_ssize_t _out_limit
    cdef char *_out
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap

    cdef int _no_read(self) except -1
    cdef tuple _serve(self, data, Py_ssize_t limit, bint first)
    cdef int _run(self, data, bint first) except -1
    cdef Py_ssize_t _split(self, const unsigned char *data, Py_ssize_t total,
                           Py_ssize_t at) except -1
    cdef Py_ssize_t _parse(self, const unsigned char *raw, Py_ssize_t total,
                           Py_ssize_t at) except -1
    cdef bint _deliver(self, list command) except -1
    cdef bint _execute(self, list command) except -1
    cdef Py_ssize_t _whole(self, const unsigned char *raw, Py_ssize_t total,
                           Py_ssize_t at) except -2
    cdef Py_ssize_t _inline(self, const unsigned char *raw, Py_ssize_t size) except -2
    # The hook: answer the command given as spans (``count`` of them, at most 8), or not.
    cdef bint _answer(self, const char **arg, Py_ssize_t *size, Py_ssize_t count) except -1
    # The reply buffer, for _answer.
    cdef int _reserve(self, Py_ssize_t more) except -1
    cdef int _append(self, const char *data, Py_ssize_t size) except -1
    cdef int _bulk_reply(self, const char *value, Py_ssize_t size) except -1
