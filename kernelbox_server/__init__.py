"""kernelbox's server: the engine (`kernelbox_server.sandbox`, the repository's `sandbox/`) and
the service over it (`kernelbox_server.service`, the repository's `service/`).

The two folders stay at the top of the repository; this package gives them names of their
own once installed (`sandbox` and `service` alone would collide with other projects). Here
they are links to those folders, which the wheel build follows.
"""
