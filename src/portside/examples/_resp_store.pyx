# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=False
"""The RESP example's compiled fast path: the compiled RESP framer, answering the plain forms
of PING, ECHO, GET, SET, INCR and DECR itself, on the example's store, as it parses them.

``StoreFramer`` is a ``portside.protocols._resp.RespFramer`` (cimported through its ``.pxd``,
the framer's C interface) that overrides its one hook, ``_answer``. Everything it does not
take (any other command or form, a key with a time to live, a value that is not a canonical
integer for INCR) it hands back, and ``RespHandler``'s Python methods, the reference, run it;
a differential test holds the two to the same replies and store.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_GetItem, PyDict_SetItem, PyDict_Size
from cpython.ref cimport PyObject

from portside.protocols._resp cimport RespFramer, format_integer


cdef inline bint named(const char *arg, Py_ssize_t size, const char *upper,
                       Py_ssize_t length) noexcept:
    """``arg.upper() == upper``, for an all-letters ``upper``, without making the bytes."""
    cdef Py_ssize_t i
    if size != length:
        return False
    for i in range(size):
        if (<unsigned char>arg[i] | 0x20) != (<unsigned char>upper[i] | 0x20):
            return False
    return True


cdef class StoreFramer(RespFramer):
    """A RESP framer whose ``serve`` answers plain string commands on ``store`` (values:
    bytes) and ``expires`` (keys with a time to live: those are left to the caller)."""

    cdef readonly dict store
    cdef readonly dict expires
    #: Replies in RESP3 (after ``HELLO 3``): only the null differs here.
    cdef public bint resp3

    def __init__(self, dict store not None, dict expires not None, *args, **limits):
        RespFramer.__init__(self, *args, **limits)
        self.store = store
        self.expires = expires
        self.resp3 = False

    cdef bint _answer(self, const char **arg, Py_ssize_t *size, Py_ssize_t count) except -1:
        """Answer a command given as spans, if it is a plain form of one taken here; False if
        not (the handler's own dispatch then runs it, with its arity checks and error texts)."""
        if size[0] == 3:
            if count == 2 and named(arg[0], 3, b"GET", 3):
                return self._get(PyBytes_FromStringAndSize(arg[1], size[1]))
            if count == 3 and named(arg[0], 3, b"SET", 3):
                key = PyBytes_FromStringAndSize(arg[1], size[1])
                PyDict_SetItem(self.store, key, PyBytes_FromStringAndSize(arg[2], size[2]))
                if PyDict_Size(self.expires):
                    self.expires.pop(key, None)
                self._append(b"+OK\r\n", 5)
                return True
        elif size[0] == 4:
            if named(arg[0], 4, b"PING", 4):
                if count == 1:
                    self._append(b"+PONG\r\n", 7)
                    return True
                if count == 2:
                    self._bulk_reply(arg[1], size[1])
                    return True
            elif count == 2 and named(arg[0], 4, b"ECHO", 4):
                self._bulk_reply(arg[1], size[1])
                return True
            elif count == 2 and named(arg[0], 4, b"INCR", 4):
                return self._add(PyBytes_FromStringAndSize(arg[1], size[1]), 1)
            elif count == 2 and named(arg[0], 4, b"DECR", 4):
                return self._add(PyBytes_FromStringAndSize(arg[1], size[1]), -1)
        return False

    cdef bint _get(self, key) except -1:
        cdef PyObject *value
        if PyDict_Size(self.expires) and PyDict_Contains(self.expires, key):
            return False  # it may have expired: the caller's lookup decides
        value = PyDict_GetItem(self.store, key)
        if value == NULL:
            if self.resp3:
                self._append(b"_\r\n", 3)
            else:
                self._append(b"$-1\r\n", 5)
            return True
        if not PyBytes_CheckExact(<object>value):
            return False
        self._bulk_reply(PyBytes_AS_STRING(<object>value), PyBytes_GET_SIZE(<object>value))
        return True

    cdef bint _add(self, key, long long by) except -1:
        """INCR/DECR where the value is absent or a canonical integer of at most 18 digits (so
        the sum cannot overflow); anything else is left to the caller, errors included."""
        cdef PyObject *old
        cdef const unsigned char *p
        cdef Py_ssize_t size, i = 0
        cdef long long value = 0
        cdef bint negative = False
        cdef char digits[24]
        if PyDict_Size(self.expires) and PyDict_Contains(self.expires, key):
            return False
        old = PyDict_GetItem(self.store, key)
        if old != NULL:
            if not PyBytes_CheckExact(<object>old):
                return False
            p = <const unsigned char *>PyBytes_AS_STRING(<object>old)
            size = PyBytes_GET_SIZE(<object>old)
            if size and p[0] == 45:  # '-'
                negative = True
                i = 1
            # Redis's string2ll, as resp.py's parse_integer: 0 or -?[1-9][0-9]*, no more.
            if not 0 < size - i <= 18 or not 49 <= p[i] <= 57:
                if not (size == 1 and p[0] == 48):
                    return False
            while i < size:
                if not 48 <= p[i] <= 57:
                    return False
                value = value * 10 + (p[i] - 48)
                i += 1
            if negative:
                value = -value
        value += by
        size = format_integer(value, digits)
        PyDict_SetItem(self.store, key, PyBytes_FromStringAndSize(digits, size))
        self._append(b":", 1)
        self._append(digits, size)
        self._append(b"\r\n", 2)
        return True
