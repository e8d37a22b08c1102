from pathlib import Path

from device_sim.history import TypingHistory


def test_newest_fifth_is_held_out(tmp_path: Path):
    history = TypingHistory(tmp_path / "history.sqlite")
    # Inserted out of order: the split follows timestamps, not insertion order.
    history.add([(float(ts), f"message {ts}") for ts in [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]])
    train, held_out = history.split()
    assert held_out == ["message 9", "message 10"]
    assert train == [f"message {ts}" for ts in range(1, 9)]


def test_history_is_a_real_sqlite_file_that_persists(tmp_path: Path):
    path = tmp_path / "history.sqlite"
    history = TypingHistory(path)
    history.add([(1.0, "hello"), (2.0, "world")])
    history.close()
    assert path.read_bytes().startswith(b"SQLite format 3")
    assert TypingHistory(path).texts() == ["hello", "world"]


def test_an_empty_history_has_nothing_to_hold_out(tmp_path: Path):
    assert TypingHistory(tmp_path / "h.sqlite").split() == ([], [])
