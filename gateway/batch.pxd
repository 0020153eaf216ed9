# C types for gateway/batch.py when Cython compiles it (setup.py); the .py stays plain Python.
cimport cython

ctypedef const unsigned char *cbytes

@cython.locals(p=cbytes, k=Py_ssize_t, o=Py_ssize_t, fl=int)
cpdef object _scan_bytes(bytes payload, Py_ssize_t off, Py_ssize_t n)

@cython.locals(p=cbytes, k=Py_ssize_t, o=Py_ssize_t, ch=int, v="long long", sq="unsigned long long", sh="unsigned long long",
               cnt="long long[256]", tot="long long[256]", sqhi="unsigned long long[256]",
               sqlo="unsigned long long[256]", lo="long long[256]", hi="long long[256]")
cpdef list _aggs_bytes(bytes payload, Py_ssize_t off, Py_ssize_t i, Py_ssize_t j)

cdef long long _i32(cbytes p, Py_ssize_t o) noexcept

@cython.locals(p=cbytes, size=Py_ssize_t, idlen=Py_ssize_t, n=Py_ssize_t, off=Py_ssize_t, k=Py_ssize_t, o=Py_ssize_t,
               boot="long long", base="long long", base_t="long long", bto=object, fl=int,
               ordered=bint, t="long long", lo="long long", hi="long long", prev="long long", d=cbytes)
cpdef object _head_bytes(bytes payload, bytes devb)

@cython.locals(hi="long long")
cdef long long _u32(cbytes p, Py_ssize_t o) noexcept

@cython.locals(buf=object)  # a generic object: Cython's list slice assignment takes lists only
cpdef object raw_rows(dev, boot, base, base_t, toffs, chans, flags, vals)
