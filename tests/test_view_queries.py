"""view_queries.History: every tab, at every window and under filters, equals the `connections`
view summed by hand, whichever way it is computed (the window's pairs, or the totals of
everything stored less the outside)."""

import itertools
import random
import shutil
from pathlib import Path

import pytest

from picosnitch.connection import Connection, Endpoint, Identity, ProcessInfo
from picosnitch.store import queries as view_queries
from picosnitch.store import sqlite as sqlite_store
from picosnitch.store.queries import BY_COLUMN, DIMENSIONS, HOUR, Filter, History, Row, bucket_width

START = 1_700_000_000 - 1_700_000_000 % HOUR + 1234  # mid-hour
DAYS = 3
ODD = b"caf\xe9\x00\x1b[31m".decode("utf-8", "surrogateescape")

IDENTITY_COLUMNS = [d.column for d in DIMENSIONS if d.side == "identity"] + ["netns"]
ENDPOINT_COLUMNS = ["family", "protocol", "laddr", "lport", "raddr", "rport", "domain"]


def write_history(path: str) -> None:
    """Three days of 10-minute windows: programs whose connections come and go (pausing now and
    then); few local ports, so that different connections share them."""
    rng = random.Random(3)
    processes = [ProcessInfo(f"/usr/bin/{name}", name, f"{name} --flag", f"{k:064x}")
                 for k, name in enumerate(("curl", "firefox", "ssh", ODD))]
    processes += [ProcessInfo("/usr/bin/python3.11", "python3", f"python3 {script}", "9" * 64, script, f"{k:064x}")
                  for k, script in enumerate(("/home/u/sync.py", "/home/u/backup.py", "/tmp/" + ODD))]
    people = [Identity(rng.choice(processes), rng.choice(processes), rng.choice(processes),
                       uid=rng.choice((0, 1000)), container=rng.choice(("", "docker-1.scope")))
              for _ in range(8)]
    places = [Endpoint(2, rng.choice((6, 17)), rng.choice(("10.0.0.2", "192.168.1.5")),
                       40000 + rng.randrange(6), rng.choice(("93.184.216.34", "10.0.0.9", ODD)),
                       rng.choice((53, 443, 22)), rng.choice(("com.example", "", ODD)))
              for _ in range(30)]
    # (identity, endpoint, from, until): some last minutes, some days
    pairs = [(rng.choice(people), rng.choice(places), born, born + rng.choice((600, 5400, 86400)))
             for born in (START + rng.randrange(DAYS * 86400) for _ in range(150))]
    conn, _ = sqlite_store.open_db(path)
    writer = sqlite_store.SqliteWriter(conn)
    for ts in range(START, START + DAYS * 86400, 600):
        active = [(i, e) for i, e, born, dies in pairs if born <= ts < dies and rng.random() < 0.5]
        writer.write([Connection(i, e, ts, rng.randrange(10**6), rng.randrange(10**7), 1, 1)
                      for i, e in active])
    sqlite_store.close_db(conn)


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("view") / "snitch.db")
    write_history(path)
    return path


@pytest.fixture(scope="module")
def history(db_path):
    history = History(sqlite_store.open_readonly(db_path))
    yield history
    history.conn.close()


@pytest.fixture(scope="module")
def rows(history):
    cursor = history.conn.execute("SELECT * FROM connections")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def by_hand(rows, column, start, end, filters) -> list:
    """The tab, summed from the view's rows in Python."""
    width = bucket_width(start, end)
    sums = {}
    for row in rows:
        if (start is not None and row["ts"] < start) or (end is not None and row["ts"] >= end):
            continue
        if not all(kept(row, f) for f in filters):
            continue
        if column == "contime":
            value = row["ts"] - row["ts"] % width if width else row["ts"]
        else:
            value = row[column]
        entry = sums.setdefault(value, [0, 0, set()])
        entry[0] += row["send"]
        entry[1] += row["recv"]
        entry[2].add(tuple(row[c] for c in IDENTITY_COLUMNS + ENDPOINT_COLUMNS))
    return ordered(Row(value, send, recv, len(pairs))
                   for value, (send, recv, pairs) in sums.items())


def ordered(tab) -> list:
    return sorted(tab, key=lambda row: (row.value, row.send, row.recv, row.conns))


def kept(row, f: Filter) -> bool:
    if f.column == "contime":
        inside = f.value <= row["ts"] < f.value + f.width
    else:
        inside = row[f.column] == f.value
    return inside != f.exclude


def windows():
    """Whole history, long windows (the totals' way), short ones (the pairs' way), windows in
    the past (a history step), aligned on the hour or not."""
    end = START + DAYS * 86400
    return [(None, None), (START - 86400, end + 3600), (START + 7, end + 1),
            (START + 3600 * 5 + 99, end + 1), (START + 86400 - 1234, end - 3600 * 7 + 1),
            (START + 86400 - 1234, START + 2 * 86400 - 1234), (end - 2 * 3600, end + 1),
            (end - 600 * 3 - 5, end + 1), (START + 3600 * 30 + 1, START + 3600 * 30 + 600),
            (end + 3600, end + 7200)]


def filter_sets(rows, start, end):
    """No filter, filters on the identity, on the endpoint (with or without the local port),
    excluding ones, two at once, and the entry time (an hour, or one write window)."""
    rng = random.Random(start)
    row = rng.choice(rows)
    width = bucket_width(start, end) or 1
    bucket = row["ts"] - row["ts"] % width if width > 1 else row["ts"]
    return [[], [Filter("exe", row["exe"])], [Filter("raddr", row["raddr"])],
            [Filter("lport", row["lport"])], [Filter("name", row["name"], exclude=True)],
            [Filter("uid", row["uid"]), Filter("domain", row["domain"], exclude=True)],
            [Filter("pexe", row["pexe"]), Filter("lport", row["lport"])],
            [Filter("contime", bucket, width=width)],
            [Filter("contime", bucket, exclude=True, width=width), Filter("exe", row["exe"])]]


@pytest.mark.parametrize("start, end", windows())
def test_every_tab_equals_the_view_summed_by_hand(history, rows, start, end):
    for filters in filter_sets(rows, start, end):
        history.forget_window()
        for dimension in DIMENSIONS:
            got = history.tab(dimension.column, start, end, filters)
            assert ordered(got) == by_hand(rows, dimension.column, start, end, filters), \
                (dimension.column, filters)
            totals = [row.send + row.recv for row in got]
            assert totals == sorted(totals, reverse=True)


def temp_tables(history) -> set:
    return {name for (name,) in history.conn.execute("SELECT name FROM temp.sqlite_master")}


def test_long_windows_read_the_totals_and_short_ones_the_pairs(db_path, rows):
    end = START + DAYS * 86400
    history = History(sqlite_store.open_readonly(db_path))
    history.tab("raddr", None, None, [Filter("exe", "/usr/bin/curl")])
    history.tab("lport", START + 86400, end + 1, [])  # 2 of 3 days
    assert temp_tables(history) == {"outside"}
    history.tab("raddr", end - 86400, end, [])  # 1 of 3 days
    assert temp_tables(history) == {"outside", "pairs"}
    # the totals do not keep the local port together with the address: pairs again, built
    # under the filter
    history.tab("raddr", None, None, [Filter("lport", rows[0]["lport"])])
    assert history.conn.execute("""SELECT DISTINCT e.lport FROM temp.pairs
        JOIN endpoints AS e ON e.id = pairs.endpoint_id""").fetchall() == [(rows[0]["lport"],)]
    history.conn.close()


def test_both_ways_agree_after_a_prune_that_cut_an_hour_in_two(tmp_path):
    path = str(tmp_path / "snitch.db")
    write_history(path)
    conn, _ = sqlite_store.open_db(path)
    sqlite_store.prune(conn, DAYS - 1, now=START + DAYS * 86400 - 1800)  # raw rows of an
    sqlite_store.close_db(conn)  # hour go, its rollup row stays, as whole hours are kept
    history = History(sqlite_store.open_readonly(path))
    first, last = history.bounds()
    for start, end in ((None, None), (first - 7, last + 1), (first + 1, last - 3600),
                       (first - first % HOUR + 600, last + 1)):
        for column, filters in itertools.product(
                ("exe", "raddr", "lport"), ([], [Filter("exe", "/usr/bin/ssh")])):
            history.forget_window()
            assert history._tab_from_totals(
                BY_COLUMN[column], "totals_by_lport" if column == "lport" else "totals_by_peer",
                start, end, filters) == history._tab_from_pairs(BY_COLUMN[column], start, end,
                                                                 filters)
    history.conn.close()


def test_bounds_are_the_first_and_last_write_windows(history, rows):
    assert history.bounds() == (min(r["ts"] for r in rows), max(r["ts"] for r in rows))


def test_a_version_1_database_reads_the_same_before_and_after_its_migration(tmp_path):
    """Before the daemon restarts after an upgrade, snitch.db has no rollups yet."""
    path = tmp_path / "snitch.db"
    shutil.copy(Path(__file__).parent / "data" / "snitch-v1.db", path)  # see test_sqlite_store

    def everything():
        history = History(sqlite_store.open_readonly(str(path)))
        first, last = history.bounds()
        shown = [history.tab(d.column, start, end, [])
                 for d in DIMENSIONS for start, end in ((None, None), (first + 1800, last + 1))]
        shown.append(view_queries.series(history.conn, "exe", first, last + 1, []))
        history.conn.close()
        return shown

    before = everything()
    assert all(before)
    sqlite_store.close_db(sqlite_store.open_db(str(path))[0])  # as the daemon starts
    assert everything() == before
