"""The links between workers: whole messages only, a sender that never waits, exact drops."""

import multiprocessing
import os
import pickle
import signal
import time

from picosnitch import channels

ctx = multiprocessing.get_context("fork")


def test_a_message_arrives_whole_and_in_order():
    reader, sender = channels.pair()
    for n in range(100):
        sender.send({"n": n})
    assert [reader.recv()["n"] for _ in range(100)] == list(range(100))


def test_a_large_list_goes_as_shorter_lists_that_each_fit_a_packet():
    reader, sender = channels.pair(sender_waits=True)
    items = [("x" * 200, i) for i in range(10_000)]
    received = []

    child = ctx.Process(target=lambda: [sender.send(items), os._exit(0)])
    child.start()
    while sum(len(part) for part in received) < len(items):
        received.append(reader.recv())
    child.join()
    assert len(received) > 1 and [item for part in received for item in part] == items


def test_one_item_larger_than_a_packet_goes_in_fragments():
    reader, sender = channels.pair(sender_waits=True)
    huge = ["L" * 3_000_000]  # a command line of 3 MB
    child = ctx.Process(target=lambda: [sender.send(huge), sender.send("after"), os._exit(0)])
    child.start()
    assert reader.recv() == huge
    assert reader.recv() == "after"
    child.join()


def test_a_reader_killed_between_messages_leaves_the_next_reader_whole_messages():
    reader, sender = channels.pair()

    def read_forever():
        while True:
            reader.recv()

    victim = ctx.Process(target=read_forever)
    victim.start()
    messages = [[n] * 2000 for n in range(200)]  # ~4 KB each: many are in flight at any moment
    for message in messages[:100]:
        sender.send(message)
        sender.finish()
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    for message in messages[100:]:
        sender.send(message)
    sender.finish(5)
    # the next reader starts at a message boundary, whatever the victim had taken
    got = []
    while reader.poll(0.5):
        got.append(reader.recv())
    assert got and got == messages[-len(got):]
    assert reader.broken == 0


def test_fragments_whose_start_the_reader_never_saw_are_dropped_and_counted():
    reader, sender = channels.pair()
    packets = channels.fragments(pickle.dumps(["y" * 200_000]))
    assert len(packets) > 2
    for packet in packets[1:]:  # the first fragment went to a reader that was then killed
        sender.sock.send(packet)
    sender.send("next")
    assert reader.recv() == "next"
    assert reader.broken == 1


def test_a_sender_never_waits_and_drops_its_oldest_messages_beyond_its_bound():
    reader, sender = channels.pair(limit=1 << 20)
    begun = time.monotonic()
    for n in range(2000):  # 2000 messages of ~10 KB: far more than the socket and the bound hold
        sender.send([n, "z" * 10_000], tally=n)
    assert time.monotonic() - begun < 5  # nobody read, yet nothing waited
    dropped = sender.take_dropped()
    # the oldest of those the socket had not taken, each counted once
    assert len(dropped) > 1000 and dropped == list(range(dropped[0], dropped[0] + len(dropped)))
    assert sender.queued <= 1 << 20
    delivered = []
    while reader.poll(0.1) or sender.queued:
        channels.wait([], 0.01, [sender])
        while reader.poll(0):
            delivered.append(reader.recv()[0])
    assert sorted(delivered + dropped) == list(range(2000))
