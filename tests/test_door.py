"""The frontend's fair door: per-flow lines, fair release (start-time fair queueing), caps,
leaving the line.

The door is a data structure over asyncio futures; these tests drive it
directly, in one event loop, with no timing: a request is "in" when its
future is done.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from splitspace.cpu_frontend.door.door import FairDoor, Place
from splitspace.shared.contract.errors import QUEUE_FULL, Throttled


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class Line:
    """Requests holding their places at a door, entered and left by name."""

    def __init__(self, door: FairDoor) -> None:
        self.door = door
        self.stack = contextlib.ExitStack()
        self.held: dict[str, tuple[contextlib.ExitStack, Place]] = {}
        self.order: list[str] = []  # names in the order they got in

    def arrive(self, name: str, flow: str, cap: int = 100) -> None:
        stack = contextlib.ExitStack()
        ticket = stack.enter_context(self.door.hold(flow, cap))
        self.held[name] = (stack, ticket)
        self._collect()

    def leave(self, name: str) -> None:
        stack, _ = self.held.pop(name)
        stack.close()
        self._collect()

    def inside(self) -> list[str]:
        return [n for n, (_, p) in self.held.items() if p.inside]

    def finish_oldest(self) -> None:
        """The request that went in first is done."""
        self.leave(next(n for n in self.order if n in self.held))

    def _collect(self) -> None:
        for name, (_, place) in self.held.items():
            if place.inside and name not in self.order:
                self.order.append(name)


def test_a_new_flow_is_not_behind_another_flows_backlog():
    async def scenario() -> list[str]:
        line = Line(FairDoor(per_flow=1, total=1))
        for i in range(5):
            line.arrive(f"heavy{i}", "key:heavy")
        line.arrive("light", "key:light")
        while line.inside():
            line.leave(line.inside()[0])
        return line.order

    order = run(scenario())
    assert order[:3] == ["heavy0", "light", "heavy1"], order  # fair order, not arrival order
    assert sorted(order) == sorted([f"heavy{i}" for i in range(5)] + ["light"])


def test_per_flow_room_bounds_what_reaches_the_gpu_tier():
    async def scenario() -> tuple[list[str], int, int]:
        door = FairDoor(per_flow=2, total=100)
        line = Line(door)
        for i in range(6):
            line.arrive(f"a{i}", "key:a")
        line.arrive("b0", "key:b")
        return line.inside(), door.inside, door.waiting

    inside, n_in, n_wait = run(scenario())
    assert inside == ["a0", "a1", "b0"] and (n_in, n_wait) == (3, 4)


def drain(line: Line) -> list[str]:
    """Finish the requests inside, oldest first, until nothing is left: the order they got in."""
    while line.inside():
        line.finish_oldest()
    return line.order


def test_flows_take_turns_when_the_total_binds():
    async def scenario() -> list[str]:
        line = Line(FairDoor(per_flow=5, total=2))
        for flow in "abc":
            for i in range(3):
                line.arrive(f"{flow}{i}", f"key:{flow}")
        return drain(line)

    order = run(scenario())
    # a0 and a1 got in at once (room for two): a has had two turns, so b and c, which had
    # none, have two first; then the flows take turns, one request each per round
    assert order == ["a0", "a1", "b0", "c0", "b1", "c1", "a2", "b2", "c2"], order


def test_a_new_flow_goes_next_behind_a_crowd_of_backlogs():
    async def scenario() -> tuple[list[str], int]:
        line = Line(FairDoor(per_flow=1, total=10))
        for c in range(200):  # 200 flows x 5 requests: 10 inside, 990 waiting
            for i in range(5):
                line.arrive(f"c{c}.{i}", f"key:c{c}")
        for _ in range(250):  # every flow has had its first turn, 60 their second
            line.finish_oldest()
        arrived_at = len(line.order)
        line.arrive("light", "key:light")
        return drain(line), arrived_at

    order, arrived_at = run(scenario())
    # the next place that frees is the light client's, not the 141st: the 140 flows still
    # owed their second turn each wait one request more
    assert order.index("light") == arrived_at, order.index("light") - arrived_at
    second_turns = [n for n in order[arrived_at:] if n.endswith(".1")]
    assert len(second_turns) == 140
    assert order.index(second_turns[-1]) < min(order.index(n) for n in order if n.endswith(".2"))


def test_in_a_burst_every_flow_has_a_turn_before_any_has_a_third():
    async def scenario() -> list[str]:
        line = Line(FairDoor(per_flow=2, total=64))
        for c in range(200):  # as a crowd arrives: flow by flow, 10 each
            for i in range(10):
                line.arrive(f"c{c}.{i}", f"key:c{c}")
        return drain(line)

    order = run(scenario())
    assert order[:64] == [f"c{c}.{i}" for c in range(32) for i in range(2)]  # room at once
    first_third = min(order.index(n) for n in order if n.endswith(".2"))
    assert {n.split(".")[0] for n in order[:first_third]} == {f"c{c}" for c in range(200)}


def test_a_waiters_place_counts_the_flows_due_before_it():
    async def scenario() -> list[int]:
        line = Line(FairDoor(per_flow=2, total=64))
        for c in range(200):  # 32 flows have two inside; 168 have not been let in yet
            for i in range(10):
                line.arrive(f"c{c}.{i}", f"key:c{c}")
        line.arrive("light", "key:light")
        light = line.held["light"][1]
        places = []
        while not light.inside:  # one request let in each time one finishes
            places.append(light.position())
            line.finish_oldest()
        return places

    # behind the 168 flows that have had no turn either; the estimate is exact here
    assert run(scenario()) == list(range(169, 0, -1))


def test_a_quiet_door_used_much_owes_nothing_later():
    async def scenario() -> list[str]:
        line = Line(FairDoor(per_flow=1, total=1))
        for i in range(100):  # a alone, one at a time: in at once, every time
            line.arrive(f"early{i}", "key:a")
            line.finish_oldest()
        line.arrive("a0", "key:a")
        for i in range(3):
            line.arrive(f"a{i + 1}", "key:a")
            line.arrive(f"b{i}", "key:b")
        return drain(line)[100:]

    # the crowd (b) comes: a and b take turns, a is not sent to the back for its 100
    assert run(scenario()) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3"]


def test_a_flow_away_earns_no_credit():
    async def scenario() -> list[str]:
        line = Line(FairDoor(per_flow=1, total=1))
        line.arrive("b0", "key:b")
        for i in range(4):
            line.arrive(f"a{i}", "key:a")
        for _ in range(3):
            line.leave(line.inside()[0])  # b0, a0, a1 served (a2 goes in); b has nothing waiting
        for i in range(1, 4):
            line.arrive(f"b{i}", "key:b")  # b comes back after a's turns
        return drain(line)

    order = run(scenario())
    # b starts again at the door's virtual time: it alternates with a, it does not get
    # the turns it missed in a row
    assert order == ["b0", "a0", "a1", "a2", "b1", "a3", "b2", "b3"], order


def test_weights_share_the_places():
    async def scenario() -> list[str]:
        door = FairDoor(per_flow=1, total=1)
        line = Line(door)
        line.arrive("first", "key:z")
        for i in range(8):
            ticket = door.join("key:pro", 100, weight=2.0)
            line.held[f"pro{i}"] = (contextlib.ExitStack(), ticket)
            line.held[f"pro{i}"][0].callback(ticket.leave)
            line.arrive(f"free{i}", "key:free")
        return drain(line)

    order = run(scenario())
    served = order[1:13]  # both backlogged: weight 2 gets two turns for each one of weight 1
    assert sum(n.startswith("pro") for n in served) == 8 and sum(n.startswith("free") for n in served) == 4, order


def test_a_client_allowed_more_running_has_that_much_room():
    async def scenario() -> int:
        door = FairDoor(per_flow=2, total=100)
        places = [door.join("key:pro", 100, room=4) for _ in range(6)]  # max_running = 4
        return sum(p.inside for p in places)

    assert run(scenario()) == 4


def test_over_cap_is_refused_and_counts_what_waits():
    async def scenario() -> None:
        door = FairDoor(per_flow=1, total=10)
        line = Line(door)
        for i in range(3):
            line.arrive(f"x{i}", "addr:10.0.0.1", cap=3)
        with pytest.raises(Throttled) as refused:
            line.arrive("x3", "addr:10.0.0.1", cap=3)
        assert refused.value.title == QUEUE_FULL and "3 requests already in flight" in refused.value.message
        door.check_cap("addr:10.0.0.2", 1)  # another flow is not affected

    run(scenario())


def test_leaving_the_line_before_going_in():
    async def scenario() -> tuple[list[str], int]:
        door = FairDoor(per_flow=1, total=1)
        line = Line(door)
        line.arrive("first", "key:a")
        line.arrive("gives-up", "key:b")
        line.arrive("patient", "key:c")
        line.leave("gives-up")  # the caller went away while waiting
        line.leave("first")
        return line.inside(), door.count("key:b")

    inside, left = run(scenario())
    assert inside == ["patient"] and left == 0


def test_place_estimate_counts_rounds_over_active_flows():
    async def scenario() -> list[int]:
        door = FairDoor(per_flow=1, total=1000)
        tickets = []
        stack = contextlib.ExitStack()
        for flow in ("key:a", "key:b", "key:c"):
            for _ in range(3):
                tickets.append((flow, stack.enter_context(door.hold(flow, 100))))
        places = [t.position() for _, t in tickets]
        stack.close()
        return places

    places = run(scenario())
    # inside: a0, b0, c0 (place 0); a1 waits behind one of its own: one round of 3 flows
    assert places == [0, 4, 7, 0, 4, 7, 0, 4, 7]


def test_ten_thousand_flows_all_get_in_exactly_once():
    async def scenario() -> tuple[int, int, int]:
        door = FairDoor(per_flow=1, total=100)
        stacks: dict[int, contextlib.ExitStack] = {}
        went_in: list[int] = []
        for i in range(10_000):
            stacks[i] = contextlib.ExitStack()
            ticket = stacks[i].enter_context(door.hold(f"addr:10.{i // 256 % 256}.{i % 256}.1", 100))
            ticket.turn.add_done_callback(lambda t, i=i: went_in.append(i))
        await asyncio.sleep(0)
        peak, served = door.inside, 0
        while went_in:
            stacks.pop(went_in.pop(0)).close()  # done: its place goes to the next flow
            served += 1
            await asyncio.sleep(0)
        return peak, served, door.waiting + door.inside

    peak, served, left = run(scenario())
    assert (peak, served, left) == (100, 10_000, 0)


def test_a_handed_over_place_is_taken_once_and_only_by_its_flow():
    async def scenario() -> None:
        door = FairDoor(per_flow=1, total=10)
        place = door.join("key:a", 5)
        nonce = door.hand_over(place)
        assert door.take(nonce, "key:b") is None  # another flow's pass is worth nothing
        nonce = door.hand_over(place)
        assert door.take(nonce, "key:a") is place
        assert door.take(nonce, "key:a") is None  # once
        place.leave()
        place.leave()  # leaving twice gives back one place
        assert (door.inside, door.count("key:a")) == (0, 0)

    run(scenario())


def test_a_parked_call_takes_no_place_until_its_caller_comes_back():
    """A REST call answered with an event id joins parked: it counts against its flow's cap,
    never goes in, and lets the callers who are there go first; when its caller comes back it
    joins the line (unread calls let in held the door full while the GPU idled)."""

    async def scenario() -> None:
        door = FairDoor(per_flow=1, total=1)
        parked = [door.join("attacker", cap=3, parked=True) for _ in range(3)]
        assert door.count("attacker") == 3 and door.inside == door.waiting == 0
        with pytest.raises(Throttled):  # parked calls count against the cap
            door.join("attacker", cap=3)
        light = door.join("light", cap=3)
        assert light.inside and not any(p.inside for p in parked)  # the door was empty for it
        parked[1].unpark()  # its caller opened the stream: in line behind the light
        assert not parked[1].inside and parked[1].position() == 1
        light.leave()
        assert parked[1].inside and not parked[0].inside and not parked[2].inside
        parked[1].leave()
        assert door.inside == 0  # nobody waiting: the door stays empty for the parked calls
        parked[0].leave()  # never claimed: gives its room in the cap back
        parked[2].unpark()
        assert parked[2].inside
        parked[2].leave()
        assert door.count("attacker") == 0 and door.inside == door.waiting == 0

    run(scenario())
