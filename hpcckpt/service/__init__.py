"""hpcckptd: the per-node checkpoint service, its protocol and its authorization.

The daemon is the security boundary of a cluster: it holds root's power (ptrace of any
process, choosing PIDs and address spaces) and lends it to ordinary users for their own
processes and images only. Who asks is read from the socket, never from the request.
"""
