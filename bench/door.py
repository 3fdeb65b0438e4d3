"""Per-decision cost of the frontend's fair door at 100, 1,000 and 10,000 waiting clients.

Why: every request that reaches the frontend joins the door (``cpu_frontend/door/door.py``),
every one that finishes lets the next in, and every waiter's status asks its place, all
on the frontend's one event loop; a cost that grew with the number of waiting flows
would turn a crowd into a stall. This times each operation alone, in the door itself
(no tiers, no I/O).

Setup per size N: N API-key flows with 3 requests each at a door with room for 64
inside and one per flow (the rest wait). Timed, in the thread's CPU time:

- position: the estimated place of each of the last 1,000 waiters;
- leave + next: a request inside finishes and the door lets the next one in, until
  20,000 have (or all have);
- join: 1,000 new flows join a full door.

Printed: microseconds per call, and the growth ratio 10,000 / 100 (the bar set for
the scheduler core in the second release: at most 3x). Run: python bench/door.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitspace.cpu_frontend.door.door import FairDoor, Place  # noqa: E402

SIZES = (100, 1_000, 10_000)


async def measure(n: int) -> dict[str, float]:
    door = FairDoor(per_flow=1, total=64)
    inside: deque[Place] = deque()

    def track(place: Place) -> Place:
        if place.inside:
            inside.append(place)
        else:
            place.turn.add_done_callback(lambda t, p=place: None if t.cancelled() else inside.append(p))
        return place

    places = [track(door.join(f"key:f{i}", 100)) for _ in range(3) for i in range(n)]
    waiters = [p for p in places if not p.inside][-1000:]
    clock = time.thread_time
    t0 = clock()
    for p in waiters:
        p.position()
    position = (clock() - t0) / len(waiters)
    done, spent = 0, 0.0
    while done < 20_000:
        if not inside:
            await asyncio.sleep(0)  # the turns just given run their callbacks
            if not inside:
                break
        t0 = clock()
        inside.popleft().leave()
        spent += clock() - t0
        done += 1
    t0 = clock()
    for i in range(1000):
        door.join(f"key:new{i}", 100)
    join = (clock() - t0) / 1000
    return {"position": position, "leave + next": spent / done, "join": join}


def main() -> None:
    rows = {n: asyncio.run(measure(n)) for n in SIZES}
    ops = list(rows[SIZES[0]])
    print("== the frontend's fair door: microseconds per call (thread CPU time) ==")
    print(f"{'waiting flows':>14}" + "".join(f"{op:>15}" for op in ops))
    for n, row in rows.items():
        print(f"{n:>14,}" + "".join(f"{row[op] * 1e6:>13.1f}us" for op in ops))
    print(f"{'10,000 / 100':>14}" + "".join(f"{rows[SIZES[-1]][op] / rows[SIZES[0]][op]:>14.2f}x" for op in ops))


if __name__ == "__main__":
    main()
