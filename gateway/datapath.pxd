# C types for gateway/datapath.py when Cython compiles it (setup.py, gateway/accel.py); the .py
# stays plain Python. The Gateway's attributes the data path reads per message are C fields of
# its base class (untyped objects: the pure and the compiled windows/watermarks both fit); every
# other attribute of the Gateway stays in its instance dict.
cimport cython

cdef class DataPath:
    cdef public object stats, out, dedup, devices, admission, watermarks, dev_windows, group_windows
    cdef public object retain, max_future, max_devices, groups, _group_wm
    cdef public dict _nchan, _groups_cache
    cdef dict __dict__
