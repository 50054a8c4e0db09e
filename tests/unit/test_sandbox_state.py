"""sandbox/state.py: the file the CLI and the running world share."""

from __future__ import annotations

from sandbox.state import StandingRow, StateStore


def test_listings_round_trip_and_bump_the_generation(tmp_path):
    state = StateStore.for_home(tmp_path)
    start = state.generation()
    state.list("zen.spamhaus.org", "127.0.0.10", "127.0.0.2", "test")
    state.list("zen.spamhaus.org", "127.0.0.10", "127.0.0.4", "again")  # replaces
    [listing] = state.listings()
    assert (listing.subject, listing.code, listing.reason) == ("127.0.0.10", "127.0.0.4", "again")
    assert state.generation() == start + 2
    # a second store on the same file (another process) sees the same
    assert StateStore.for_home(tmp_path).listings() == [listing]
    assert state.unlist("zen.spamhaus.org", "127.0.0.10")
    assert not state.unlist("zen.spamhaus.org", "127.0.0.10")
    assert state.listings() == []


def test_overrides_knobs_and_commands(tmp_path):
    state = StateStore.for_home(tmp_path)
    state.override("Sel._domainkey.Acme.example.", "txt", ["v=DKIM1; p=X"], "broken")
    [o] = state.overrides()
    assert (o.name, o.rdtype, o.values) == ("sel._domainkey.acme.example", "TXT", ("v=DKIM1; p=X",))
    state.set_knob("complaint_share", {"*": 0.05})
    assert state.knobs() == {"complaint_share": {"*": 0.05}}
    state.set_knob("complaint_share", None)
    assert state.knobs() == {}
    command = state.request("set-reputation", ip="127.0.0.10", score=80)
    [pending] = state.pending_commands()
    assert (pending.id, pending.name, pending.args) == (
        command,
        "set-reputation",
        {"ip": "127.0.0.10", "score": 80},
    )
    assert state.command_result(command) is None
    state.finish_command(command, "done")
    assert state.command_result(command) == "done"
    assert state.pending_commands() == []


def test_standings_verdicts_and_complaints(tmp_path):
    state = StateStore.for_home(tmp_path)
    row = StandingRow("google", "127.0.0.10", -3.0, 0.0, 5, 2, 1, 0, 1.0)
    state.save_standings([row])
    state.save_standings([StandingRow("google", "127.0.0.10", 4.0, 0.0, 6, 2, 1, 0, 2.0)])
    assert [s.score for s in state.standings()] == [4.0]
    before = state.last_verdict_id()
    state.add_verdicts([(1.0, "google", "127.0.0.10", "a@gmail.com", "accepted", "250 OK")])
    assert state.verdict_counts(before) == {("google", "accepted"): 1}
    complaint = state.add_complaint("yahoo", "127.0.0.10", "a@yahoo.com", "<1@x>", "/tmp/r.eml")
    state.settle_complaint(complaint, "refused", "530 5.7.0 Authentication required")
    [c] = state.complaints()
    assert (c["status"], c["reply"]) == ("refused", "530 5.7.0 Authentication required")
    state.delete_standings(None, "127.0.0.10")
    assert state.standings() == []
