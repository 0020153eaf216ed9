# C types for gateway/windows.py when Cython compiles it (setup.py, gateway/accel.py); the .py stays
# plain Python. Times, counts and sums stay Python ints (untrusted, unbounded): the types only make
# the attribute, dict and list accesses direct.
cimport cython

cdef Py_ssize_t _N, _SUM, _SQ, _MIN, _MAX, _REV  # state list slots

cdef class _Key:
    cdef public dict wins
    cdef public object due

cdef class WindowSet:
    cdef public object scope, size, offset, lateness
    cdef public dict keys, dirty
    # the checkpoint's (export, fold_rows): untyped, any attribute may be added there
    cdef public object purged, _f_up, _f_del, results
    cdef public object fired, revisions, open_count
    cdef dict __dict__

    @cython.locals(k=_Key)
    cpdef due_after(self, key, wm)

    @cython.locals(k=_Key, wins=dict, dirty=dict, st=list, due=object)
    cpdef add_aggs(self, key, start, aggs, wm)

    @cython.locals(k=_Key, st=list, start=object, last=object)
    cpdef add(self, key, ch, t, v, wm)

    @cython.locals(k=_Key, wins=dict, dirty=dict, st=list, due=object, items=list)
    cpdef advance(self, key, wm)

    cpdef _emit(self, key, ch, start, list st, wm)
