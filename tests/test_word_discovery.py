"""Word discovery (aggregator/discovery.py, device_sim/word_votes.py): discovery rounds through the round manager
and the simulated fleet, the vocabulary's growth, and the votes a round refuses."""

from __future__ import annotations

import json
import math
import time

import pytest

from aggregator.api.client import AggregatorClient, AggregatorRefusedError
from aggregator.api.schemas import EvaluationReport, Vote
from aggregator.inprocess import InProcessClient
from aggregator.process import local_aggregator_config
from device_sim.fleet import Fleet, typing_times
from device_sim.phone import Phone
from keyboard_model.evaluate import evaluate
from keyboard_model.suggest import Suggester
from keyboard_model.tokenizer import KeyboardTokenizer
from keyboard_model.triehh import TrieHHConfig
from keyboard_model.weights import model_from_bytes
from tests.conftest import SMALL_TEXT
from tests.helpers import fedkb, fleet_config

NEW_WORD = "zorblat"  # typed by every phone but one
ONE_PHONE_WORD = "quixotry"  # typed by that one phone only, far more often than anyone types anything


def discovery_phones(folder, count):
    phones = []
    for n in range(count):
        # Typed throughout the day the histories span, so that a phone has typed its own word by any round.
        own = f"a {ONE_PHONE_WORD} day" if n == 0 else f"the {NEW_WORD}"
        texts = [text for t in range(12) for text in (SMALL_TEXT[(n + t) % len(SMALL_TEXT)], own)]
        phones.append(Phone.create(f"phone-{n:05d}", folder / f"phone-{n:05d}", typing_times(texts, 1.0)))
    return phones


def discovery_client(folder, tokenizer_path, model_config, **changes):
    settings = dict(model=model_config, clients_per_round=5, simulated_clock=True, round_deadline_s=3600.0,
                    population=40, discover_every=2, discovery_theta=4, discovery_sampling_rate=0.2,
                    discovery_max_word_length=10, selection_window_s=0.0) | changes
    return InProcessClient(local_aggregator_config(folder, tokenizer_path, **settings))


@pytest.mark.slow
def test_a_word_many_phones_type_is_discovered_and_then_suggested_and_one_phones_word_never_is(
        tmp_path, small_tokenizer_path, small_model_config):
    client = discovery_client(tmp_path, small_tokenizer_path, small_model_config)
    phones = discovery_phones(tmp_path / "phones", 40)
    fleet = Fleet(phones, fleet_config(tmp_path / "phones", vanish_probability=0.0, update_compression="none"),
                  client)
    old_tokenizer = KeyboardTokenizer.from_json(client.tokenizer_json())
    held_out = [m for phone in phones for m in phone.held_out(old_tokenizer)]
    try:
        kinds, before_growth = [], None
        while len(kinds) < 30 and client.status().words_discovered == 0:
            if client.status().round_kind == "discovery" and before_growth is None:
                before_growth = model_from_bytes(client.model())[0]
            report = fleet.run_round()
            kinds.append(client.status(recent=1).recent_rounds[-1].round_kind)
            own = [p.outcome for p in report.participations if p.round == report.round]
            assert own and all(outcome == "voted" for outcome in own) == (kinds[-1] == "discovery"), own
        grown_tokenizer = KeyboardTokenizer.from_json(client.tokenizer_json())
        grown = model_from_bytes(client.model())[0]
        for _ in range(12):
            fleet.run_round()
        trained = model_from_bytes(client.model())[0]
    finally:
        fleet.close()

    assert kinds[:2] == ["training", "training"] and "discovery" in kinds
    assert NEW_WORD in grown_tokenizer.token_to_id, kinds
    assert ONE_PHONE_WORD not in grown_tokenizer.token_to_id
    # Old words keep their ids, and the grown model scores old positions as the model before it did.
    assert all(grown_tokenizer.token_to_id[token] == i for token, i in old_tokenizer.token_to_id.items())
    assert grown.config.vocab_size == grown_tokenizer.vocab_size == old_tokenizer.vocab_size + 1
    assert before_growth is not None
    old = evaluate(before_growth, old_tokenizer, held_out)
    kept = evaluate(grown, grown_tokenizer, held_out)
    assert abs(kept.recall_at_1 - old.recall_at_1) <= 0.02 and abs(kept.recall_at_3 - old.recall_at_3) <= 0.02
    # Before training reaches it, the new word is suggested nowhere; after a few rounds, where the phones type it.
    assert NEW_WORD not in Suggester(grown, grown_tokenizer).suggest("the ")
    assert NEW_WORD in Suggester(trained, grown_tokenizer).suggest("the ")
    # What the records say: counts, never the words.
    rounds = client.status(recent=40).recent_rounds
    discovery = [r for r in rounds if r.round_kind == "discovery"]
    assert sum(r.words_discovered or 0 for r in discovery) == 1 and rounds[-1].words_discovered_total == 1
    assert NEW_WORD not in client.status(recent=40).model_dump_json()


def test_a_restarted_aggregator_serves_the_grown_vocabulary_and_resumes_a_discovery(
        tmp_path, small_tokenizer_path, small_model_config):
    from aggregator.discovery import DiscoveryState
    from aggregator.global_model import GlobalModel
    from aggregator.storage import open_storage

    config = local_aggregator_config(tmp_path, small_tokenizer_path, model=small_model_config)
    storage = open_storage(config.db_path)
    model = GlobalModel(config, storage)
    under_way = DiscoveryState(discoveries=1, campaign=(frozenset({"z", "zo"}), 3))
    model.grow_vocabulary([NEW_WORD], {"round": 1, "closed_at": 0.0, "status": "closed", **under_way.record()})
    storage.close()
    client = discovery_client(tmp_path, small_tokenizer_path, small_model_config)
    assert NEW_WORD in KeyboardTokenizer.from_json(client.tokenizer_json()).token_to_id
    assert model_from_bytes(client.model())[0].config.vocab_size == model.tokenizer.vocab_size
    status = client.status(recent=0)
    assert status.round_kind == "discovery" and status.vocab_size == model.tokenizer.vocab_size


def vote_checkin(client, devices):
    """Enrol devices until one is selected for the open (discovery) round: its check-in."""
    for _ in range(devices):
        token = client.enrol().device_token
        decision = client.checkin(token)
        if decision.action == "vote":
            return decision
    raise AssertionError("no device was asked to vote")


def test_a_discovery_round_refuses_votes_no_honest_phone_could_cast_and_counts_one_per_phone(
        tmp_path, small_tokenizer_path, small_model_config):
    client = discovery_client(tmp_path, small_tokenizer_path, small_model_config, discover_every=1,
                              discovery_sampling_rate=0.1)
    # A trie under way: its second round asks for two characters extending "z".
    client._rounds.discovery.state = client._rounds.discovery.state.__class__(1, 1, 0, (frozenset({"z"}), 2))
    client._rounds.round = client._rounds._open_round(client._rounds.round.number)
    decision = vote_checkin(client, 3)
    assert decision.discovery.depth == 2 and decision.discovery.frontier == ["z"]
    for bad in ("zoo", "qo", "$", "z", "z1", "zO", "z "):
        with pytest.raises(AggregatorRefusedError) as refused:
            client.vote(decision.round, decision.upload_token, Vote(prefix=bad))
        assert refused.value.status_code == 422, bad
    with pytest.raises(AggregatorRefusedError) as refused:
        client.upload(decision.round, decision.upload_token, b"not a vote")
    assert refused.value.status_code == 409
    first = client.vote(decision.round, decision.upload_token, Vote(prefix="zo"))
    again = client.vote(decision.round, decision.upload_token, Vote(prefix="zo"))
    assert not first.duplicate and again.duplicate and again.reported == 1


@pytest.mark.slow
def test_fedkb_simulate_discover_words_grows_the_runs_tokenizer_and_counts_training_rounds(tmp_path):
    """The main job's path: discovery rounds on top of --rounds training rounds, the run folder's tokenizer grown with
    the model it is served with, and the summary scored with it. Every phone types the new word, so that the few
    sampled find it for sure."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"user": f"user-{u}", "text": f"{SMALL_TEXT[(u + n) % len(SMALL_TEXT)]} the {NEW_WORD}", "ts": n})
        + "\n" for u in range(30) for n in range(10)))
    (tmp_path / "proxy.txt").write_text("\n".join(SMALL_TEXT) + "\n")
    out = tmp_path / "run"
    result = fedkb("simulate", "--corpus", str(corpus), "--proxy-text", str(tmp_path / "proxy.txt"),
                   "--data-dir", str(tmp_path / "data"), "--min-messages", "5", "--embedding-dim", "8",
                   "--hidden-dim", "16", "--clients-per-round", "2", "--rounds", "3", "--in-process", "--no-progress",
                   "--discover-words", "--discover-every", "1", "--discovery-theta", "2",
                   "--discovery-sampling-rate", "0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    kinds = [line["round_kind"] for line in lines]
    assert kinds.count("training") == 3 and kinds.count("discovery") >= 1, kinds
    tokenizer = KeyboardTokenizer.from_file(out / "tokenizer.json")
    model = model_from_bytes((out / "model.safetensors").read_bytes())[0]
    assert NEW_WORD in tokenizer.token_to_id and model.config.vocab_size == tokenizer.vocab_size
    assert lines[-1]["words_discovered_total"] >= 1
    assert json.loads((out / "summary.json").read_text())["final"]["recall_at_1"] >= 0


@pytest.mark.slow
def test_the_browser_phone_votes_in_a_discovery_round(tmp_path, start_aggregator, small_tokenizer_path,
                                                       small_model_config):
    """"This browser is a phone" takes part in discovery rounds as every phone does, through the real service."""
    from web_demo.browser_phone import BrowserPhone, NewMessage, PhoneSettings

    # A first round no phone reports to fails at its deadline; the discovery round comes after it.
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, round_deadline_s=1.0, population=1,
                                  clients_per_round=1, discover_every=1, discovery_theta=2, discovery_sampling_rate=1.0)
    phone = BrowserPhone(tmp_path / "browser-phone", aggregator.url, check_in_s=1.0)
    phone.configure(PhoneSettings(enabled=True, charging=True, idle=True, wifi=True))
    for _ in range(6):
        phone.add_message(NewMessage(text=f"the {NEW_WORD} is here"))
    client = AggregatorClient(aggregator.url)
    deadline = time.monotonic() + 20
    while client.status(recent=0).round_kind != "discovery" and time.monotonic() < deadline:
        time.sleep(0.2)
    phone._step()
    voted = client.status(recent=1).recent_rounds[-1]
    # One vote, below θ = 2: the round closes once its one phone has voted, and adds nothing.
    assert voted.round_kind == "discovery" and voted.reported == 1 and voted.discovery_prefixes_added == 0
    assert phone.state().activity.startswith(f"voted in word discovery round {voted.round}: the start (1 letters)")


def test_a_discovery_rounds_record_says_nothing_of_votes_below_the_threshold(small_tokenizer):
    """Only the trie is covered by the accounting: a round's record must be the same whether or not a phone cast a
    vote that stayed below θ."""
    from aggregator.discovery import DiscoveryState, WordDiscovery

    discovery = WordDiscovery(TrieHHConfig(theta=4, sampling_rate=0.2, max_word_length=8), every=1, last_record=None)
    discovery.state = DiscoveryState(training_rounds=1)
    records = []
    for votes in ({}, {"phone-a": "q"}, {"phone-a": "q", "phone-b": None, "phone-c": "z"}):
        open_round, discovery.state = discovery.opened()
        open_round.votes.update(votes)
        record, words, _ = discovery.closed(open_round, small_tokenizer)
        records.append(record)
        discovery.state = DiscoveryState(training_rounds=1)
    assert records[0] == records[1] == records[2] and not words


def test_the_spent_epsilon_survives_a_restart_without_discovery_and_a_one_vote_threshold_is_refused(
        tmp_path, small_tokenizer_path, small_model_config):
    from aggregator.config import AggregatorConfig
    from aggregator.discovery import WordDiscovery
    from aggregator.storage import open_storage

    storage = open_storage(tmp_path / "a.sqlite")
    discovery = WordDiscovery(TrieHHConfig(theta=4, sampling_rate=0.2, max_word_length=8), 1, None)
    _, discovery.state = discovery.opened()
    row = {"round": 1, "status": "closed", "started_at": 0.0, "closed_at": 0.0}
    storage.record_round({**row, **discovery.state.record()}, None, None)
    storage.record_round({**row, "round": 2}, None, None)  # a restart without --discover-words ran round 2
    restored = WordDiscovery(TrieHHConfig(theta=10, sampling_rate=0.05, max_word_length=8), 1,
                             storage.last_round_with("discoveries"))
    assert restored.state.discoveries == 1 and restored.state.epsilon == pytest.approx(9 * math.log(5))
    with pytest.raises(ValueError, match="at least 2 votes"):
        AggregatorConfig(db_path=tmp_path / "b.sqlite", tokenizer_path=small_tokenizer_path, discover_every=1,
                         discovery_theta=1, discovery_sampling_rate=0.1)


def test_a_discovery_round_closes_once_its_sample_has_voted_or_aborted_and_takes_no_evaluation(
        tmp_path, small_tokenizer_path, small_model_config):
    client = discovery_client(tmp_path, small_tokenizer_path, small_model_config, discover_every=1, population=10,
                              clients_per_round=2, discovery_sampling_rate=0.2)
    client._rounds.discovery.state = client._rounds.discovery.state.__class__(training_rounds=1)
    client._rounds.round = client._rounds._open_round(client._rounds.round.number)
    first, second = vote_checkin(client, 1), vote_checkin(client, 1)
    with pytest.raises(AggregatorRefusedError) as refused:  # a voter was not asked to score: no figure of its own
        client.report_evaluation(first.round, first.upload_token, EvaluationReport(
            model_version=0, positions=2000, hits_at_1=2000, hits_at_3=2000))
    assert refused.value.status_code == 422
    client.vote(first.round, first.upload_token, Vote(prefix="q"))
    assert client.status(recent=0).round == first.round
    client.abort(second.round, second.upload_token)
    assert client.status(recent=0).round == first.round + 1
