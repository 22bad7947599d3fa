"""A lane's scheduler: which image holds which rows. Plain bookkeeping: no threads, no torch.

It seats waiting images in free rows (one row, two when guided), picks the padded size of
the next step and the row moves that compact the occupied rows below it, advances every
image by one cell after a step and says which finished a token row or the whole grid, and
frees an image's rows the moment it leaves. The lane applies what it decides to the device
(engine.step_runner) and tells the event loop (engine.lanes).
"""

from __future__ import annotations

from .jobs import Image


class Scheduler:
    """The rows of one lane: `capacity` of them, stepped at one of `sizes` (ascending, the
    last one `capacity`) for grids of `seq_len` cells in rows of `cols`."""

    def __init__(self, capacity: int, sizes: tuple[int, ...], cols: int, seq_len: int) -> None:
        self.capacity = capacity
        self.sizes = sizes
        self.cols = cols
        self.seq_len = seq_len
        self.free = list(range(capacity))  # ascending: a heap would do; sorted lists stay small
        self.active: list[Image] = []
        self.filtering = 0  # active images that use top-k or top-p

    # ---- joining ---------------------------------------------------------------------------
    def seat(self, image: Image) -> bool:
        """Give `image` its rows, the lowest free ones; False (and nothing changes) when they
        are not free."""
        guided = image.job.guided
        if len(self.free) < 1 + guided:
            return False
        image.cond = self.free.pop(0)
        image.uncond = self.free.pop(0) if guided else None
        return True

    def admit(self, images: list[Image]) -> None:
        """Seated images start sampling at the next step."""
        self.active.extend(images)
        self.filtering += sum(im.job.filtered for im in images)

    # ---- stepping --------------------------------------------------------------------------
    def compact(self) -> tuple[int, list[int], list[int]]:
        """(size, src, dst): the padded size of the next step (the smallest that holds every
        occupied row) and the moves that bring rows at or above it into free rows below it
        (already recorded here; the caller moves the rows' state)."""
        used = sum(len(im.rows) for im in self.active)
        size = next(s for s in self.sizes if s >= used)
        high = [(im, r) for im in self.active for r in im.rows if r >= size]
        if not high:
            return size, [], []
        low = [r for r in self.free if r < size][: len(high)]
        for (im, old), new in zip(high, low, strict=True):
            if im.cond == old:
                im.cond = new
            else:
                im.uncond = new
        src = [r for _, r in high]
        self.free = sorted(set(self.free) - set(low) | set(src))
        return size, src, low

    @property
    def filtered(self) -> bool:
        """Whether some active image uses top-k or top-p (its step needs the sort)."""
        return self.filtering > 0

    def advance(self) -> tuple[list[Image], list[Image]]:
        """The coming step moves every active image one cell on. Returns (rows, finished):
        images that completed a token row the event loop hears of (every row of a streamed
        job, the first row of any other, for its time to first row) and images whose grid is
        complete."""
        cols, T = self.cols, self.seq_len
        for im in self.active:
            im.pos += 1
        rows = [im for im in self.active if im.pos % cols == 0 and (
            im.job.on_row is not None or (im.pos == cols and im.job.first_row is None))]
        finished = [im for im in self.active if im.pos == T]
        return rows, finished

    # ---- leaving ---------------------------------------------------------------------------
    def release(self, images: list[Image]) -> list[int]:
        """The images leave; returns the rows they freed."""
        gone = set(map(id, images))
        self.active = [im for im in self.active if id(im) not in gone]
        rows = [r for im in images for r in im.rows]
        self.filtering -= sum(im.job.filtered for im in images)
        self.free = sorted(self.free + rows)
        return rows

    def cancelled(self) -> list[Image]:
        """Active images whose job was cancelled (client gone, deadline)."""
        return [im for im in self.active if im.job.cancelled]

    def clear(self) -> list[Image]:
        """Every image leaves (a failed step); returns them. All rows are free again."""
        images = self.active
        self.active, self.filtering = [], 0
        self.free = list(range(self.capacity))
        return images
