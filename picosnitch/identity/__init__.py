"""The identity stage: who sent the kernel's bytes.

The resolver turns kernel records into Connections: the image the sender's exec made
(identity.process_table, by exec_id), executable path and sha256 of the file that ran, from the
descriptor the monitor pinned at exec (pin_store, hashing, with fanotify re-hashing a changed
file), the script an interpreter ran or the program ld.so loaded (interpreters), markers of an
unusual executable (exe_state), command line, parent and grandparent, container (containers),
domain (dns), and drops what "Log ignore" names (log_ignore). worker is the process that runs it.
"""
