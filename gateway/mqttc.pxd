# C types for gateway/mqttc.py when Cython compiles it (setup.py); the .py stays plain Python.
cimport cython

ctypedef const unsigned char *cbytes

@cython.locals(d=cbytes, n=Py_ssize_t, o=Py_ssize_t, ln=Py_ssize_t, end=Py_ssize_t, p=Py_ssize_t, c=int, shift=int,
               first=int, kind=int, qos=int, mid=Py_ssize_t)
cpdef tuple cut(bytes buf, Py_ssize_t off, object queue, Py_ssize_t limit, Py_ssize_t tag, object now, set inflight)

@cython.locals(k=Py_ssize_t, m=Py_ssize_t, out=bytearray)
cpdef bytes puback_of(object mids, Py_ssize_t conn)
