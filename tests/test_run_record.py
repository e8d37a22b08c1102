"""A run's `run.toml` keeps every phase of the run: the first as the options `--config` runs again, each later
start (resumed into the folder) with the options it changed."""

from __future__ import annotations

from pathlib import Path

from device_sim.run_record import RUN_RECORD, RunRecord, recordable, start_record
from fedkb.cli import COMMANDS
from fedkb.composition import simulation_options
from keyboard_model.commands import command_parser, parse


def test_a_resumed_run_keeps_its_first_phase_runnable_and_records_every_later_one(tmp_path: Path, shakespeare):
    parser = command_parser("fedkb", "", COMMANDS)
    out = tmp_path / "run"

    def options(*flags: str) -> dict[str, object]:
        return simulation_options(parse(parser, ["simulate", "--out", str(out), *flags]))

    # Service mode on a time budget; then resumed twice in process, with other options.
    first_flags = ["--rounds", "3", "--time-budget", "60"]
    first = options(*first_flags)
    later = options("--rounds", "1", "--clients-per-round", "4", "--lr", "0.5", "--in-process")
    said: list[str] = []
    start_record(out, "simulate", first, shakespeare, log=said.append)
    start_record(out, "simulate", later, shakespeare, log=said.append)
    start_record(out, "simulate", later, shakespeare, log=said.append)

    record = RunRecord.read(out)
    assert record.options == recordable(first)
    assert [(phase.changed, phase.unset) for phase in record.phases] == [
        ({"clients_per_round": 4, "in_process": True, "lr": 0.5, "rounds": 1}, ("time_budget",))] * 2
    assert all(record.started <= phase.started for phase in record.phases)
    assert record.latest_options() == recordable(later)
    # The switch to in-process is flagged with the other changes, once: the third start ran as the second had.
    assert len(said) == 1
    for change in ("--in-process on (was off)", "--rounds 1 (was 3)", "--lr 0.5 (was 1.0)",
                   f"--clients-per-round 4 (was {first['clients_per_round']})", "--time-budget unset (was 60.0)"):
        assert change in said[0]
    # `--config run.toml` runs the first phase again: the same options as its flags, but for --config.
    again = parse(parser, ["simulate", "--config", str(out / RUN_RECORD)])
    assert {**vars(again), "config": None} == vars(parse(parser, ["simulate", "--out", str(out), *first_flags]))
