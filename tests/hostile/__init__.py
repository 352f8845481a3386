"""Hostile clients of the registry port (issue 23, docs/security.md).

Any pod can reach the registry port, so these tests play a pod that does not read,
that opens and drops connections by the ten thousand, or that holds more than its
share, against a real server, while honest requests go on and must keep being
served. Bounds are generous multiples of what the server promises: the machine is
shared and slow, and a test here fails on behaviour (a lost request, a held spool,
a filled descriptor table), not on a few hundred milliseconds.
"""
