"""Order in which the server serves pending client requests within one round.

Clients compute in parallel but the server runs one forward+backward at a time, so a round is the
single-machine problem with release dates, processing times and delivery times (``1|r_j|Lmax``,
"head-body-tail"): client i's request arrives at ``arrival`` (its forward + upload), takes
``service`` on the server, then needs ``tail`` (gradient download + client backward) to finish.
The round ends when the last client finishes: ``makespan = max_i(service_end_i + tail_i)``.

Two kinds of policy share one interface:

* dynamic (``fifo``, ``random``, ``longest_tail_first``): whenever the server is free it picks
  among the requests that have arrived (``pick``) and never idles while one is waiting;
* planned (``round_robin``, ``exact``): ``plan`` fixes an order up front and the server serves it
  strictly, each job starting at ``max(server free, arrival)``; it may wait for the next job in
  the plan while others are pending. That is what a lockstep loop over client ids does, and the
  optimum sometimes needs it (waiting for a long-tail job beats starting a long short-tail one).

Times are seconds from the start of the round.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from splitcom.errors import UserError

MAX_EXACT = 9  # 9! = 362,880 orders; branch and bound is fast up to here, with no guarantee beyond


@dataclass(frozen=True)
class Job:
    cid: int  # client id
    arrival: float  # request reaches the server (client forward + upload), s
    service: float  # server forward + backward, s
    tail: float  # gradient download + client backward after service, s

    def __post_init__(self) -> None:
        if min(self.arrival, self.service, self.tail) < 0:
            raise ValueError(f"job {self.cid}: times must be >= 0")


@dataclass(frozen=True)
class ScheduleResult:
    order: list[int]  # client ids in service order
    start: dict[int, float]  # cid -> service start, s
    end: dict[int, float]  # cid -> service end, s
    done: dict[int, float]  # cid -> end + tail: client finished its step, s
    makespan: float  # max(done), s

    @property
    def server_idle(self) -> float:
        """Seconds the server waited between the first arrival and its last service end."""
        if not self.order:
            return 0.0
        busy = sum(self.end[c] - self.start[c] for c in self.order)
        return self.end[self.order[-1]] - min(self.start.values()) - busy


class Policy:
    """Base: dynamic policies override ``pick``, planned ones ``plan``."""

    name = "policy"
    planned = False

    def reset(self, jobs: Sequence[Job]) -> None:
        """Called once per ``simulate`` before any pick; dynamic policies may ignore it."""

    def pick(self, pending: Sequence[Job], now: float) -> int:
        """Index into ``pending`` (non-empty, arrived by ``now``) of the job to serve next."""
        raise NotImplementedError

    def plan(self, jobs: Sequence[Job]) -> list[int]:
        """Service order as client ids (planned policies only)."""
        raise NotImplementedError


class RoundRobin(Policy):
    """Lockstep by client id, as a ``for cid in clients`` server loop; waits for a late client."""

    name = "round_robin"
    planned = True

    def plan(self, jobs: Sequence[Job]) -> list[int]:
        return sorted(j.cid for j in jobs)


class Fifo(Policy):
    """First arrived, first served (ties: lower client id)."""

    name = "fifo"

    def pick(self, pending: Sequence[Job], now: float) -> int:
        return min(range(len(pending)), key=lambda i: (pending[i].arrival, pending[i].cid))


class RandomPick(Policy):
    """Uniform among arrived requests; the generator persists across rounds, so one seed fixes a run."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def pick(self, pending: Sequence[Job], now: float) -> int:
        return self.rng.randrange(len(pending))


class LongestTailFirst(Policy):
    """Schrage's rule: among arrived requests, the longest tail first (ties: earlier, lower id).

    Optimal when all requests arrive together (Jackson's rule) and within one service time of the
    optimum in general (makespan <= OPT + max service), but not always better than FIFO: starting
    the longest-tail job can block a job with an even longer tail that arrives a moment later.
    """

    name = "longest_tail_first"

    def pick(self, pending: Sequence[Job], now: float) -> int:
        return min(range(len(pending)), key=lambda i: (-pending[i].tail, pending[i].arrival, pending[i].cid))


class Exact(Policy):
    """Minimum makespan over all service orders (idle waits allowed), by branch and bound."""

    name = "exact"
    planned = True

    def plan(self, jobs: Sequence[Job]) -> list[int]:
        return optimal_order(jobs)


def _check(jobs: Sequence[Job]) -> None:
    cids = [j.cid for j in jobs]
    if len(set(cids)) != len(cids):
        raise ValueError(f"duplicate client ids in {cids}")


def evaluate_order(jobs: Sequence[Job], order: Sequence[int]) -> ScheduleResult:
    """Serve ``order`` (client ids) strictly, each job at ``max(server free, its arrival)``."""
    _check(jobs)
    by_cid = {j.cid: j for j in jobs}
    if sorted(order) != sorted(by_cid):
        raise ValueError(f"order {list(order)} is not a permutation of the job ids")
    t = 0.0
    start, end, done = {}, {}, {}
    for c in order:
        j = by_cid[c]
        start[c] = max(t, j.arrival)
        t = end[c] = start[c] + j.service
        done[c] = t + j.tail
    return ScheduleResult(list(order), start, end, done, max(done.values(), default=0.0))


def simulate(jobs: Sequence[Job], policy: Policy) -> ScheduleResult:
    """Event simulation of one round under ``policy`` (see the module docstring for both kinds)."""
    _check(jobs)
    policy.reset(jobs)
    if policy.planned:
        return evaluate_order(jobs, policy.plan(jobs))
    waiting = sorted(jobs, key=lambda j: (j.arrival, j.cid))
    t, order = 0.0, []
    while waiting:
        pending = [j for j in waiting if j.arrival <= t]
        if not pending:  # idle only when nothing has arrived
            t = waiting[0].arrival
            continue
        chosen = pending[policy.pick(pending, t)]
        waiting.remove(chosen)
        order.append(chosen.cid)
        t = max(t, chosen.arrival) + chosen.service
    return evaluate_order(jobs, order)


def optimal_order(jobs: Sequence[Job]) -> list[int]:
    """An order of minimum makespan; branch and bound seeded with Schrage's schedule.

    Lower bound of a partial order ending at ``t`` with jobs R left: the larger of
    ``max_{j in R}(max(t, r_j) + p_j + q_j)`` (each job alone) and
    ``max(t, min r) + sum p + min q`` (all of R back to back).
    """
    _check(jobs)
    n = len(jobs)
    if n > MAX_EXACT:
        raise UserError(f"the exact schedule handles at most {MAX_EXACT} clients, got {n}; "
                        "use longest_tail_first (within one service time of optimal)",
                        where="federation.schedule")
    if n == 0:
        return []
    seed = simulate(jobs, LongestTailFirst())
    best = [seed.makespan, seed.order]
    js = sorted(jobs, key=lambda j: (j.arrival, j.cid))

    def bound(t: float, rest: list[Job]) -> float:
        alone = max(max(t, j.arrival) + j.service + j.tail for j in rest)
        first = max(t, min(j.arrival for j in rest))
        packed = first + sum(j.service for j in rest) + min(j.tail for j in rest)
        return max(alone, packed)

    def dfs(t: float, worst: float, prefix: list[int], rest: list[Job]) -> None:
        if not rest:
            if worst < best[0] - 1e-12:
                best[0], best[1] = worst, list(prefix)
            return
        if max(worst, bound(t, rest)) >= best[0] - 1e-12:
            return
        # Longest tail first among the earliest starts: good orders are found early, pruning more.
        for j in sorted(rest, key=lambda j: (max(t, j.arrival), -j.tail, j.cid)):
            end = max(t, j.arrival) + j.service
            prefix.append(j.cid)
            dfs(end, max(worst, end + j.tail), prefix, [r for r in rest if r is not j])
            prefix.pop()

    dfs(0.0, 0.0, [], js)
    return best[1]


def brute_force_order(jobs: Sequence[Job]) -> list[int]:
    """Reference optimum by enumerating every permutation (tests; n <= 8 or so)."""
    _check(jobs)
    return list(min(itertools.permutations([j.cid for j in jobs]),
                    key=lambda o: evaluate_order(jobs, o).makespan, default=()))


SCHEDULES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, Fifo, RandomPick, LongestTailFirst, Exact)
}


def make_schedule(name: str, seed: int = 0) -> Policy:
    """A fresh policy by registry name; ``seed`` only matters for ``random``."""
    cls = SCHEDULES.get(name)
    if cls is None:
        raise UserError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}",
                        where="federation.schedule")
    return cls(seed) if cls is RandomPick else cls()
