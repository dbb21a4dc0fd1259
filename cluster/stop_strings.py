"""Stop strings over streamed text: emit what is safe, hold back what could begin a stop string."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class StopStringFilter:
    """Feed decoded text chunks with `push`; text up to (not including) the first stop string to
    complete is emitted, everything after it is dropped. Only a suffix that could still start a stop string is
    held back, so text flows with at most max(len(stop)) - 1 characters of delay."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        if isinstance(stop, str):  # a bare string would be read as one stop per character
            stop = [stop]
        if any(not isinstance(s, str) for s in stop):
            raise TypeError("stop strings must be str")
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stop))
        self._held = ""
        self._matched: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._matched

    def push(self, text: str) -> tuple[str, bool]:
        """Add a chunk; return (text safe to emit, whether a stop string was hit)."""
        if self._matched is not None:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            start, stop = hit
            self._matched, self._held = stop, ""
            log.debug("stop string %r hit", stop)
            return buf[:start], True
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release the held-back text at the end of the stream ("" after a stop string)."""
        out, self._held = self._held, ""
        return out

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # The stop that completes first wins, as if text arrived one character at a time, so the
        # result does not depend on how the text was chunked; on a tie the longer (earlier) one.
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest
