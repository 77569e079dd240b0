"""Guard mode: an opt-in interactive firewall on picosnitch's identities.

New connections (the first packet of each conntrack flow) go to an NFQUEUE; the guard worker
decides each from the rules file, or holds it while the user answers a prompt.

- rules.py: the rules file, parsed and indexed; first match wins.
- packet.py: the addresses and ports of a queued packet.
- nfqueue.py: the kernel's nfnetlink_queue protocol over a raw netlink socket.
- sockets.py: who owns a packet's socket (sock_diag, then /proc): exact, or unknown.
- firewall.py: the iptables rules that send new connections to the queue.
- engine.py: held connections, prompts, answers, timeouts.
- prompt_socket.py: the unix socket prompt clients (terminal, dashboard) speak over.
- desktop.py: notifications with actions, sent as the desktop user.
- store.py: verdicts in snitch.db.
- worker.py: the process that runs it all.

Its readers are in ui/: `picosnitch prompt` (prompt.py), the verdicts in `view` (verdicts.py) and
the dashboard's Guard tab (dash/guard.py).
"""
