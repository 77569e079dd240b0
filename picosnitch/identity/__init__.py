"""The identity stage: who sent the kernel's bytes.

The resolver turns kernel records into Connections: executable path and sha256 (hashing, with
fanotify re-hashing a changed file), command line, parent and grandparent (identity.process_table),
container (containers), domain (dns), and drops what "Log ignore" names (log_ignore). worker is
the process that runs it.
"""
