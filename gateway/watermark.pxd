# C types for gateway/watermark.py when Cython compiles it (setup.py, gateway/accel.py); the .py
# stays plain Python. Times stay Python ints (untrusted, unbounded).
cimport cython

cdef class _DevWm:
    cdef public object max_t, last_data
    cdef public bint active, online, in_heap

cdef class Watermarks:
    cdef public object delay, idle_timeout, global_wm, _idle_due
    cdef public dict devs
    cdef public list _heap
    cdef public set dirty
    cdef public bint global_dirty
    # the checkpoint's (export, fold_rows): untyped, any attribute may be added there
    cdef public object _f_devs, _f_global
    cdef public object idle_transitions, rejoins
    cdef dict __dict__

    @cython.locals(d=_DevWm)
    cpdef device_wm(self, dev)

    @cython.locals(d=_DevWm, advanced=bint)
    cpdef observe(self, dev, max_t, now)

    @cython.locals(h=list, devs=dict, d=_DevWm)
    cpdef _recompute(self)
