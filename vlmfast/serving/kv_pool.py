"""The engine's KV cache: fixed memory, rows that requests take and give back.

Layout. One cache of `rows` rows x `max_len` slots (the model's own new_cache, so the model's
decode_step writes it as it writes generate()'s), plus one staging row where a request's prompt
is prefilled exactly as generate() would prefill it alone (slots [0, L)). Decoding rows are kept
packed at the front, rows [0, n): the decode step runs on a view of those rows (a view of the
first rows of a contiguous tensor is contiguous, so the native CPU step still applies).

Alignment. Every decoding row writes its next token at the same slot, `length` (the model's
decode step writes one slot for the whole batch). A joining request's prompt is therefore
copied from staging so that it ends at `length`: its window is [length - L, length), the slots
before it masked out in the key mask, exactly like a left-padded row of generate(). Its rotary
positions are its own (0..L-1, then L, L+1, ...), so its answer is the one it gets alone.

Memory stays fixed: when `length` reaches max_len, or the slots before the oldest window
(read by every decode step for nothing) grow large, every window moves left by the oldest
window's start (`shift`). A request is admitted only when every live row still fits after such
a move (`fits`); it otherwise waits, prefilled, until older rows finish. When a row finishes,
the last row moves into its place (`remove`), so the live rows stay packed.

Per-row state beyond keys / values / key mask: a cache class may carry tensors with one entry
per row on their last dim (Qwen2-VL's M-RoPE `offsets`, (3, B)); they travel with their row, and
a view's `uniform` flag (all offsets zero: 1-D rotary) is recomputed for its rows.
"""

from __future__ import annotations

import copy

import torch


class KVPool:
    """rows decoding rows of max_len slots, plus one staging row for prefill.

    Per decoding row i (0 <= i < n): start[i], the first slot of its window; end[i], the slot
    its window may reach at most (start + prompt + max_tokens - 1: the last token is never
    written). key_mask[i, t] is True exactly on the real tokens of row i's window.
    """

    def __init__(self, model, rows: int, max_len: int):
        if rows < 1 or max_len < 2:
            raise ValueError(f"rows, max_len: expected >= 1 and >= 2, got {rows} and {max_len}")
        self.cache = model.new_cache(rows, max_len)
        self.staging = model.new_cache(1, max_len)
        self.rows, self.max_len = rows, max_len
        self.length = 0
        self.n = 0
        self.start: list[int] = []
        self.end: list[int] = []
        self._views: dict[int, object] = {}
        # tensors with one entry per row on the last dim, other than the key mask (see the module doc)
        self.row_state = [name for name, value in vars(self.staging).items()
                          if isinstance(value, torch.Tensor) and name != "key_mask" and value.dim() >= 1
                          and value.shape[-1] == 1 and getattr(self.cache, name).shape[-1] == rows]

    # ------------------------------------------------------------------ sizes

    @staticmethod
    def bytes_per_slot(model) -> int:
        """Bytes of keys + values of one token of one row (all layers)."""
        probe = model.new_cache(1, 2)
        return sum(t[0, :, 0].numel() * t.element_size() for t in probe.keys + probe.values)

    @property
    def free_rows(self) -> int:
        return self.rows - self.n

    @property
    def used_slots(self) -> int:
        return sum(self.length - s for s in self.start)

    # ------------------------------------------------------------------ views for the model

    def view(self, n: int | None = None):
        """The cache over decoding rows [0, n): the model's cache class, keys / values / key
        mask as views (no copy), `length` the pool's (sync_from after the model advanced it).
        One object per n, so a captured CUDA graph or the native step's plan finds it again."""
        n = self.n if n is None else n
        view = self._views.get(n)
        if view is None:
            view = copy.copy(self.cache)
            view.keys = [k[:n] for k in self.cache.keys]
            view.values = [v[:n] for v in self.cache.values]
            view.key_mask = self.cache.key_mask[:n]
            for name in self.row_state:
                setattr(view, name, getattr(self.cache, name)[..., :n])
            self._views[n] = view
        view.length = self.length
        if "offsets" in self.row_state and hasattr(view, "uniform"):
            view.uniform = not bool(view.offsets.any())
        return view

    def sync_from(self, view) -> None:
        """Takes the length a decode step advanced the view to."""
        self.length = view.length

    def padded(self) -> bool:
        """Whether some decoding row has masked slots before `length` (the key mask is needed)."""
        if self.n == 0 or self.length == 0:
            return False
        return not bool(self.cache.key_mask[: self.n, : self.length].all())

    def reset_staging(self):
        self.staging.reset()
        return self.staging

    # ------------------------------------------------------------------ admission

    def fits(self, prompt_len: int, remaining: int) -> bool:
        """Whether a request whose prompt (prompt_len slots in staging) joins now and may write
        `remaining` more slots fits beside the live rows, after a shift if need be."""
        if self.n >= self.rows:
            return False
        if self.n == 0:
            return prompt_len + remaining <= self.max_len
        bump = max(0, prompt_len - self.length)  # live rows skip `bump` slots: their ends move too
        length = self.length + bump
        starts = self.start + [length - prompt_len]
        ends = [e + bump for e in self.end] + [length + remaining]
        return max(ends) - min(starts) <= self.max_len

    def join(self, prompt_len: int, remaining: int) -> int:
        """Copies the staged prompt (slots [0, prompt_len) of staging) into a new decoding row,
        ending at `length`. Call only when fits(). Returns the row index."""
        if not self.fits(prompt_len, remaining):
            raise RuntimeError("KVPool.join: the request does not fit (check fits() first)")
        if self.n == 0:
            self.length = 0  # nothing live: start over at slot 0, as generate() alone
        if self.length < prompt_len:
            # every live row gets masked slots up to prompt_len (the key mask beyond length is
            # False) and will write its remaining tokens that much later
            bump = prompt_len - self.length
            self.end = [e + bump for e in self.end]
            self.length = prompt_len
        start = self.length - prompt_len
        if max(self.end + [self.length + remaining]) > self.max_len:
            self.shift(min(self.start + [start]))
            start = self.length - prompt_len
        row = self.n
        for dst, src in zip(self.cache.keys + self.cache.values, self.staging.keys + self.staging.values):
            dst[row, :, start:self.length].copy_(src[0, :, :prompt_len])
        for name in self.row_state:
            getattr(self.cache, name)[..., row] = getattr(self.staging, name)[..., 0]
        mask = self.cache.key_mask
        mask[row].zero_()
        mask[row, start:self.length] = True
        self.start.append(start)
        self.end.append(self.length + remaining)
        self.n += 1
        return row

    # ------------------------------------------------------------------ compaction

    def remove(self, row: int) -> None:
        """Frees decoding row `row`; the last row moves into its place (same slots)."""
        last = self.n - 1
        mask = self.cache.key_mask
        if row != last:
            lo = self.start[last]
            for t in self.cache.keys + self.cache.values:
                t[row, :, lo:self.length].copy_(t[last, :, lo:self.length])
            mask[row].copy_(mask[last])
            for name in self.row_state:
                state = getattr(self.cache, name)
                state[..., row] = state[..., last]
            self.start[row], self.end[row] = self.start[last], self.end[last]
        mask[last].zero_()
        self.start.pop()
        self.end.pop()
        self.n = last
        if self.n == 0:
            self.length = 0

    def shift(self, offset: int) -> None:
        """Moves every window `offset` slots left (offset <= every row's start)."""
        if offset <= 0:
            return
        n, length = self.n, self.length
        width = length - offset
        for t in self.cache.keys + self.cache.values:
            t[:n, :, :width] = t[:n, :, offset:length].clone()  # overlapping ranges: through a copy
        mask = self.cache.key_mask
        mask[:n, :width] = mask[:n, offset:length].clone()
        mask[:, width:].zero_()
        self.length = width
        self.start = [s - offset for s in self.start]
        self.end = [e - offset for e in self.end]

    def make_room(self) -> None:
        """Before a decode step: a slot free at `length`, and not too many dead slots read."""
        if self.n == 0:
            return
        lowest = min(self.start)
        if self.length >= self.max_len or (lowest >= 64 and 2 * lowest >= self.length):
            self.shift(lowest)
