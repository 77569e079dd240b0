"""Guard mode against real netfilter: NFQUEUE, iptables, traffic into a namespace the test makes."""

import os
import socket
import time

import pytest

from guard_harness import (PYTHON, GuardRun, HostServer, Peer, client, peer_client, sha256_of,
                           wait_for_prompts)
from netlab import HOST4, HOST6, PEER4, PEER6, NetLab


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root: iptables and network namespaces")
    with NetLab() as lab:
        lab.peer = Peer(lab, [PEER4, PEER6])
        yield lab
        lab.peer.stopped = True


def test_smoke(lab, tmp_path):
    with GuardRun(tmp_path, lab, "allow out proto tcp port %d\n" % lab.peer.ports[PEER4],
                  **{"Guard mode": "deny unknown"}) as guard:
        assert client("tcp", PEER4, lab.peer.ports[PEER4]) == "ok hi"
        assert client("udp", PEER4, lab.peer.ports[PEER4]) == "refused"
        print(guard.errors())
