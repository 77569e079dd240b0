"""What root writes: appends all or nothing, and a file root should not write is repaired or
moved aside at start (files.repair), each in one sentence."""

import os
import stat

from picosnitch import files


def test_a_missing_file_needs_nothing(tmp_path):
    assert files.repair(tmp_path / "error.log") is None


def test_roots_own_regular_file_is_left_alone(tmp_path):
    log = tmp_path / "error.log"
    log.write_text("kept\n")
    os.chmod(log, 0o644)
    assert files.repair(log) is None
    assert log.read_text() == "kept\n"


def test_a_planted_link_is_moved_aside_and_its_target_untouched(tmp_path):
    target = tmp_path / "shadow"
    target.write_text("secret\n")
    log = tmp_path / "error.log"
    log.symlink_to(target)
    said = files.repair(log)
    assert said.startswith(f"{log} was a symbolic link to {target}: root does not write through links; moved it to "
                           f"{log}.bad-")
    assert not os.path.lexists(log) and target.read_text() == "secret\n"
    aside = said.rsplit(" ", 1)[1]
    assert os.readlink(aside) == str(target)


def test_a_fifo_in_place_of_a_log_is_moved_aside(tmp_path):
    log = tmp_path / "exe.log"
    os.mkfifo(log)
    said = files.repair(log)
    assert said.startswith(f"{log} was not a regular file; moved it to {log}.bad-")
    assert not os.path.lexists(log)


def test_a_file_with_another_name_is_moved_aside_and_the_other_name_untouched(tmp_path):
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0\n")
    db = tmp_path / "snitch.db"
    os.link(other, db)
    said = files.repair(db)
    assert said.startswith(f"{db} had 2 names (hard links), so writing it would change another file too; moved it to")
    assert not db.exists() and other.read_text() == "root:x:0:0\n" and other.stat().st_nlink == 2


def test_a_file_others_may_write_becomes_roots_alone(tmp_path):
    log = tmp_path / "conn.log"
    log.write_text("kept\n")
    os.chown(log, 1000, 1000)
    os.chmod(log, 0o666)
    assert files.repair(log) == f"{log} was owned by uid 1000 and gid 1000 with mode 666; only root may write it now"
    st = log.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    assert log.read_text() == "kept\n"


def test_a_second_move_aside_the_same_second_does_not_overwrite_the_first(tmp_path):
    log = tmp_path / "exe.log"
    asides = []
    for _ in range(2):
        os.mkfifo(log)
        asides.append(files.repair(log).rsplit(" ", 1)[1])
    assert len(set(asides)) == 2 and all(stat.S_ISFIFO(os.lstat(a).st_mode) for a in asides)
