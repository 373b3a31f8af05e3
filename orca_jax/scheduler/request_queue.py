"""Waiting queues: plain FCFS, or ordered by (priority, arrival_time)."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from orca_jax.scheduler.request import Request


def priority_key(request: Request) -> tuple[int, float]:
    """Sort key of the "priority" order: lower priority value first, then earlier arrival."""
    return (request.priority, request.arrival_time)


class _QueueBase:
    """What both queues share: a sequence `_queue` whose head is the next request to admit."""

    _queue: deque[Request] | list[Request]

    def peek(self) -> Request:
        """The next request to admit, left in the queue."""
        return self._queue[0]

    def remove(self, request: Request) -> None:
        """Take out a request wherever it is (abort)."""
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class FCFSQueue(_QueueBase):
    """First come, first served: add_request order, preempted requests jump to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        """Queue a new request at the back."""
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        """Put a preempted request back at the front."""
        self._queue.appendleft(request)

    def pop(self) -> Request:
        """Take out the next request to admit."""
        return self._queue.popleft()


class PriorityQueue(_QueueBase):
    """Ordered by `priority_key`; ties keep add order, and a preempted request goes first."""

    def __init__(self) -> None:
        self._queue: list[Request] = []

    def add(self, request: Request) -> None:
        """Queue a new request after every request with a key <= its own."""
        bisect.insort_right(self._queue, request, key=priority_key)

    def prepend(self, request: Request) -> None:
        """Put a preempted request back ahead of the requests with an equal key."""
        bisect.insort_left(self._queue, request, key=priority_key)

    def pop(self) -> Request:
        """Take out the next request to admit."""
        return self._queue.pop(0)


RequestQueue = FCFSQueue | PriorityQueue
