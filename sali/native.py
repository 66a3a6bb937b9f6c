"""The head as a llama.cpp sampler in machine code: no Python runs while a token is sampled.

llama-cpp-python's custom samplers call back into Python for every token. Right after a forward
pass everything that path touches is cache-cold: the ctypes trampoline, the interpreter's objects,
the views of llama.cpp's buffers, numba's dispatcher. On the 2-core development machine that was
over 100 µs a token, most of it not the head's arithmetic. Here the head is a numba ``cfunc``
installed as the ``apply`` function of a ``llama_sampler`` of its own: llama.cpp calls machine
code directly, which reads the head's arrays and llama.cpp's raw logits through addresses held in
a small context array, and writes the candidates back in place.

The arithmetic is the same as :func:`sali.kernel._head_kernel` (tests check the two agree token
for token), with a layout that costs fewer cache misses when everything is cold: each token's
``U`` row, ``W`` row and bias sit side by side in one ``(V, 2r + 1)`` array, the promotion set's
``W`` rows are copied into one contiguous ``(m, r + 1)`` block, and a promoted token already in the
top k is found by comparing ids, not through a vocabulary-sized table.

A callback cannot raise: a head that is handed the wrong number of candidates records an error
code in the context and leaves the candidates untouched; the decoding loop reads it after the
token and stops (:attr:`NativeSampler.error`), as it does for the Python callback.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass, field

import numba
import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic

from sali.head import Head

# context slots, int64 each (alpha and the dead zone: a float64's bits)
(_ROWS, _PROMOTE, _PROMOTE_W, _MIXED, _LLAMA_CTX, _GET_LOGITS, _CLOCK_GETTIME, _CLOCK_ID, _CLOCK, _VOCAB, _RANK, _PROMOTED,
 _TOP_K, _ALPHA, _ERROR, _GOT, _CALLS, _TIMES, _TIMES_CAPACITY, _HEAP_IDS, _HEAP_LOGITS, _BLOCK_MAX, _BLOCKS, _DEAD_ZONE,
 _DEAD_ZONE_FROM) = range(25)
_SLOTS = 25
ERROR_WRONG_SIZE, ERROR_NO_LOGITS = 1, 2


def _pointer_to(dtype):
    """An intrinsic turning an int64 address into a typed pointer (for ``numba.carray``)."""
    @intrinsic
    def cast(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
        return types.CPointer(dtype)(address), codegen
    return cast


_int64_at, _int32_at, _float32_at, _float64_at = (_pointer_to(t) for t in (types.int64, types.int32, types.float32, types.float64))


@intrinsic
def _call_get_logits(typingctx, function, llama_ctx, index):
    """``float * llama_get_logits_ith(llama_context *, int32)`` called through its address; the
    result as an int64 address. Addresses come from the context at run time, so the machine code
    holds none and numba can cache it across processes."""
    def codegen(context, builder, signature, args):
        bytes_ = ir.IntType(8).as_pointer()
        kind = ir.FunctionType(bytes_, [bytes_, ir.IntType(32)])
        called = builder.call(builder.inttoptr(args[0], kind.as_pointer()),
                              [builder.inttoptr(args[1], bytes_), builder.trunc(args[2], ir.IntType(32))])
        return builder.ptrtoint(called, ir.IntType(64))
    return types.int64(types.int64, types.int64, types.int64), codegen


@intrinsic
def _call_clock_gettime(typingctx, function, clock_id, timespec):
    """``int clock_gettime(int, struct timespec *)`` called through its address."""
    def codegen(context, builder, signature, args):
        bytes_ = ir.IntType(8).as_pointer()
        kind = ir.FunctionType(ir.IntType(32), [ir.IntType(32), bytes_])
        result = builder.call(builder.inttoptr(args[0], kind.as_pointer()),
                              [builder.trunc(args[1], ir.IntType(32)), builder.inttoptr(args[2], bytes_)])
        return builder.sext(result, ir.IntType(64))
    return types.int64(types.int64, types.int64, types.int64), codegen


def _packed_kernel(ids, logits, k, raw, promote, rows, promote_w, mixed, alpha, dead_zone):
    """Rewrite llama.cpp's ``k`` candidates in place as the head's ``k + |A \\ top k|``; return the count.

    ``ids``/``logits``: int32/float32 views of the candidate array, candidate ``i`` at ``3i``;
    ``raw``: ``(V,)`` raw logits; ``promote``: ``(m,)`` int64; ``rows``: ``(V, 2r + 1)`` float32,
    ``[U | W | bias]``; ``promote_w``: ``(m, r + 1)``, ``[W | bias]`` of the promoted tokens;
    ``mixed``: ``(r + 1 + k,)`` scratch; ``dead_zone``: nats. Arithmetic as :func:`sali.kernel._head_kernel`.
    """
    r = (rows.shape[1] - 1) // 2
    top = logits[0]
    for i in range(1, k):
        if logits[3 * i] > top:
            top = logits[3 * i]
    total = 0.0
    for i in range(k):
        total += math.exp(logits[3 * i] - top)
    log_norm = top + math.log(total)
    for j in range(r):
        mixed[j] = 0.0
    mixed[r] = 1.0  # picks up the bias column
    for i in range(k):
        row = ids[3 * i]
        feature = logits[3 * i] - log_norm  # log-prob renormalised within the top k
        for j in range(r):
            mixed[j] += feature * rows[row, j]
    shrink = dead_zone > 0.0
    centre = 0.0  # the top k's mean change, weighted by the base's probabilities (dead zone only)
    for i in range(k):
        row = ids[3 * i]
        delta = 0.0
        for j in range(r + 1):
            delta += rows[row, r + j] * mixed[j]
        if shrink:  # every change is needed for the centre before any is written
            mixed[r + 1 + i] = delta
            centre += math.exp(logits[3 * i] - log_norm) * delta
        else:
            logits[3 * i] = logits[3 * i] + alpha * delta
    if shrink:
        for i in range(k):
            off = mixed[r + 1 + i] - centre
            logits[3 * i] = logits[3 * i] + alpha * (centre + min(max(off - dead_zone, 0.0), off + dead_zone))
    count = k
    for a in range(promote.shape[0]):
        token = promote[a]
        seen = False
        for i in range(k):
            if ids[3 * i] == token:
                seen = True
                break
        if seen:
            continue
        delta = 0.0
        for j in range(r + 1):
            delta += promote_w[a, j] * mixed[j]
        if shrink:
            off = delta - centre
            delta = centre + min(max(off - dead_zone, 0.0), off + dead_zone)
        ids[3 * count] = token
        logits[3 * count] = raw[token] + alpha * delta
        count += 1
    return count


_kernel = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(_packed_kernel)


@numba.njit(cache=True, nogil=True)
def _sift_down(heap_ids, heap_logits, slot, size):
    """Restore the min-heap order below `slot` (the smallest logit at the root)."""
    while True:
        child = 2 * slot + 1
        if child >= size:
            return
        if child + 1 < size and heap_logits[child + 1] < heap_logits[child]:
            child += 1
        if heap_logits[child] >= heap_logits[slot]:
            return
        heap_ids[slot], heap_ids[child] = heap_ids[child], heap_ids[slot]
        heap_logits[slot], heap_logits[child] = heap_logits[child], heap_logits[slot]
        slot = child


@numba.njit(cache=True, nogil=True)
def _heapify(heap_ids, heap_logits, size):
    """Make the first `size` entries a min-heap."""
    for slot in range(size // 2 - 1, -1, -1):
        _sift_down(heap_ids, heap_logits, slot, size)


@numba.njit(cache=True, nogil=True)
def _drain_largest_first(heap_ids, heap_logits, ids, logits, k):
    """Empty the size-`k` min-heap into candidates ``0..k-1`` of the strided views, largest first
    (each pop of the smallest goes to the back)."""
    for last in range(k - 1, -1, -1):
        ids[3 * last] = heap_ids[0]
        logits[3 * last] = heap_logits[0]
        heap_ids[0], heap_logits[0] = heap_ids[last], heap_logits[last]
        _sift_down(heap_ids, heap_logits, 0, last)


@numba.njit(cache=True, nogil=True)
def _select_top_k(ids, logits, n, k, heap_ids, heap_logits):
    """Move the `k` largest of the `n` candidates to the front, largest first, as llama.cpp's
    top-k sampler leaves them (ties in any order). One pass through a size-`k` min-heap: about
    ``n`` comparisons when few candidates beat the k-th best, which is the usual case, against a
    sort of llama_token_data structs in llama.cpp's sampler (measured about 100 µs a token at
    V = 49,152 on the 2-core development machine).

    ``ids``/``logits``: strided views as in :func:`_packed_kernel`; ``heap_ids``/``heap_logits``:
    ``(k,)`` scratch.
    """
    for i in range(k):
        heap_ids[i] = ids[3 * i]
        heap_logits[i] = logits[3 * i]
    _heapify(heap_ids, heap_logits, k)
    for i in range(k, n):
        value = logits[3 * i]
        if value > heap_logits[0]:
            heap_ids[0] = ids[3 * i]
            heap_logits[0] = value
            _sift_down(heap_ids, heap_logits, 0, k)
    _drain_largest_first(heap_ids, heap_logits, ids, logits, k)


@numba.njit(cache=True, nogil=True)
def _now(ctx) -> int:
    """Monotonic nanoseconds, through the clock_gettime address in the context."""
    _call_clock_gettime(ctx[_CLOCK_GETTIME], ctx[_CLOCK_ID], ctx[_CLOCK])
    clock = carray(_int64_at(ctx[_CLOCK]), 2)
    return clock[0] * 1_000_000_000 + clock[1]


BLOCK = 64  # raw logits per block in :func:`_select_top_k_raw`


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # no "ninf": a logit may be -inf
def _block_maxima(raw, block_max):
    """``block_max[b]`` = the largest of ``raw[b * BLOCK : (b + 1) * BLOCK]``. The full blocks get an
    inner loop of a fixed length, which the compiler unrolls (half the time of one loop whose
    length it cannot know); the last, partial block is done apart."""
    V = raw.shape[0]
    full = V // BLOCK
    for b in range(full):
        top = raw[b * BLOCK]
        for i in range(b * BLOCK + 1, (b + 1) * BLOCK):
            top = max(top, raw[i])
        block_max[b] = top
    if full < block_max.shape[0]:
        top = raw[full * BLOCK]
        for i in range(full * BLOCK + 1, V):
            top = max(top, raw[i])
        block_max[full] = top


@numba.njit(cache=True, nogil=True)
def _select_top_k_raw(raw, ids, logits, k, block_max, heap_ids, heap_logits) -> bool:
    """:func:`_select_top_k` for the whole vocabulary in token-id order, read from llama.cpp's
    contiguous ``(V,)`` raw logits: the k-th largest block maximum is a floor for the top k
    (k blocks reach it, so k logits do), so only the blocks that reach it are read, and only their
    logits at or above it are gathered (into the front of the candidate array, which holds the
    vocabulary in id order: the raw logits keep every value), and only those few hundred go
    through :func:`_select_top_k`'s size-k heap, so the cost hardly grows with k (a size-k heap
    over every logit of the blocks that reach the floor took 176 µs a token at k = 256,
    V = 49,152 on the 2-core development machine). Returns False, with the candidate
    array as it was, when fewer than k finite logits were found or the vocabulary has fewer than
    k blocks, for :func:`_select_top_k` to do it the long way."""
    n_blocks = block_max.shape[0]
    if k > n_blocks:
        return False
    _block_maxima(raw, block_max)
    for i in range(k):  # the k largest block maxima, in a min-heap: its root is the floor
        heap_ids[i] = i
        heap_logits[i] = block_max[i]
    _heapify(heap_ids, heap_logits, k)
    for b in range(k, n_blocks):
        if block_max[b] > heap_logits[0]:
            heap_ids[0] = b
            heap_logits[0] = block_max[b]
            _sift_down(heap_ids, heap_logits, 0, k)
    floor = heap_logits[0]
    V = raw.shape[0]
    count = 0
    for b in range(n_blocks):
        if block_max[b] >= floor:
            for i in range(b * BLOCK, min(V, (b + 1) * BLOCK)):
                value = raw[i]
                if value >= floor and value > -np.inf:
                    ids[3 * count] = i
                    logits[3 * count] = value
                    count += 1
    if count < k:
        for i in range(count):  # put back what was gathered over: the vocabulary in id order
            ids[3 * i] = i
            logits[3 * i] = raw[i]
        return False
    _select_top_k(ids, logits, count, k, heap_ids, heap_logits)  # over the few gathered, not every logit read
    return True


@numba.cfunc(types.void(types.CPointer(types.int64), types.CPointer(types.int64)), nogil=True, cache=True)
def _apply(sampler, cur):
    """llama.cpp's ``apply(llama_sampler *, llama_token_data_array *)``: ``sampler`` is
    ``{iface, ctx}``, ``cur`` is ``{data, size, selected, sorted}`` (as int64 words)."""
    address = sampler[1]
    ctx = carray(_int64_at(address), _SLOTS)
    if ctx[_ERROR] != 0:
        return  # the decoding loop stops at this token
    timed = ctx[_TIMES_CAPACITY] > 0
    start = _now(ctx) if timed else 0
    k, n = ctx[_TOP_K], cur[1]
    if n < k or n > ctx[_VOCAB]:
        ctx[_ERROR] = ERROR_WRONG_SIZE
        ctx[_GOT] = n
        return
    raw = _call_get_logits(ctx[_GET_LOGITS], ctx[_LLAMA_CTX], -1)
    if raw == 0:
        ctx[_ERROR] = ERROR_NO_LOGITS
        return
    V, r, m = ctx[_VOCAB], ctx[_RANK], ctx[_PROMOTED]
    data = cur[0]
    alpha = carray(_float64_at(address + 8 * _ALPHA), 1)[0]
    calls = ctx[_CALLS]  # this generation's earlier tokens: the response step
    dead_zone = carray(_float64_at(address + 8 * _DEAD_ZONE), 1)[0] if calls >= ctx[_DEAD_ZONE_FROM] else 0.0
    # llama_token_data is {int32 id; float logit; float p}: candidate i's id is word 3i of an int32
    # view of the array, its logit word 3i of a float32 view that starts 4 bytes on
    ids, logits = carray(_int32_at(data), 3 * V), carray(_float32_at(data + 4), 3 * V - 1)
    if n > k:
        heap_ids, heap_logits = carray(_int32_at(ctx[_HEAP_IDS]), k), carray(_float32_at(ctx[_HEAP_LOGITS]), k)
        # the whole vocabulary, untouched (this sampler comes first in the chain): read the raw logits
        quick = n == V and _select_top_k_raw(
            carray(_float32_at(raw), V), ids, logits, k, carray(_float32_at(ctx[_BLOCK_MAX]), ctx[_BLOCKS]), heap_ids, heap_logits)
        if not quick:
            _select_top_k(ids, logits, n, k, heap_ids, heap_logits)
    selected = _now(ctx) if timed else 0
    count = _kernel(ids, logits, k,
                    carray(_float32_at(raw), V), carray(_int64_at(ctx[_PROMOTE]), m),
                    carray(_float32_at(ctx[_ROWS]), (V, 2 * r + 1)), carray(_float32_at(ctx[_PROMOTE_W]), (m, r + 1)),
                    carray(_float32_at(ctx[_MIXED]), r + 1 + k), alpha, dead_zone)
    cur[1] = count
    cur[2] = -1  # selected: none
    cur[3] = 0  # sorted = false; the other 7 bytes of this word are the struct's padding
    if timed:  # two rings: the head's part of the call, then the top-k selection's
        capacity = ctx[_TIMES_CAPACITY]
        times = carray(_int64_at(ctx[_TIMES]), 2 * capacity)
        times[calls % capacity] = _now(ctx) - selected
        times[capacity + calls % capacity] = selected - start
    ctx[_CALLS] = calls + 1


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


@dataclass
class NativeSampler:
    """One generation's compiled head sampler (its call count is the response step, for a dead
    zone that spares the first steps): what :meth:`sali.runtime.Model.sample_tokens`
    needs of a :class:`~sali.runtime.HeadSampler` (``active``, ``top_k``, ``error``, ``calls``,
    ``seconds``, ``durations``, ``attach``), with no Python per token.

    ``llama_ctx``: the ``llama_context *`` address whose logits the head reads; ``keep_times``:
    how many of the latest calls' durations to keep (benchmarks; 0 times nothing).
    """

    head: Head
    alpha: float
    llama_ctx: int
    n_vocab: int
    keep_times: int = 0
    _context: np.ndarray = field(init=False, repr=False)
    _times: np.ndarray = field(init=False, repr=False)  # (2 * keep_times,) int64 ns: two rings the machine code writes
    _keep: list = field(init=False, repr=False)  # every buffer the machine code reads through an address

    def __post_init__(self) -> None:
        import llama_cpp

        rows, promoted = self.head.packed()
        promote = np.ascontiguousarray(self.head.promote, dtype=np.int64)
        top_k = min(self.head.k, self.n_vocab)
        mixed = np.zeros(self.head.rank + 1 + top_k, dtype=np.float32)  # the tail holds the top k's changes (dead zone)
        times = np.zeros(2 * max(self.keep_times, 1), dtype=np.int64)
        clock = np.zeros(2, dtype=np.int64)
        heap_ids, heap_logits = np.zeros(top_k, dtype=np.int32), np.zeros(top_k, dtype=np.float32)
        block_max = np.zeros(-(-self.n_vocab // BLOCK), dtype=np.float32)
        ctx = np.zeros(_SLOTS, dtype=np.int64)
        ctx[_ROWS], ctx[_PROMOTE], ctx[_PROMOTE_W] = rows.ctypes.data, promote.ctypes.data, promoted.ctypes.data
        ctx[_MIXED], ctx[_CLOCK], ctx[_TIMES] = mixed.ctypes.data, clock.ctypes.data, times.ctypes.data
        ctx[_LLAMA_CTX] = self.llama_ctx
        ctx[_GET_LOGITS] = _address(llama_cpp.llama_get_logits_ith)
        if self.keep_times:  # the platform's monotonic clock (its id differs between Linux and macOS)
            ctx[_CLOCK_GETTIME], ctx[_CLOCK_ID] = _address(ctypes.CDLL(None).clock_gettime), time.CLOCK_MONOTONIC
        ctx[_VOCAB], ctx[_RANK], ctx[_PROMOTED] = self.n_vocab, self.head.rank, promote.size
        ctx[_TOP_K] = top_k
        ctx[_HEAP_IDS], ctx[_HEAP_LOGITS] = heap_ids.ctypes.data, heap_logits.ctypes.data
        ctx[_BLOCK_MAX], ctx[_BLOCKS] = block_max.ctypes.data, block_max.size
        ctx[_ALPHA:_ALPHA + 1].view(np.float64)[0] = float(self.alpha)
        ctx[_DEAD_ZONE:_DEAD_ZONE + 1].view(np.float64)[0] = self.head.dead_zone
        ctx[_DEAD_ZONE_FROM] = self.head.dead_zone_from
        ctx[_TIMES_CAPACITY] = self.keep_times
        self._context = ctx
        self._times = times
        self._keep = [rows, promoted, promote, mixed, times, clock, heap_ids, heap_logits, block_max]

    @property
    def active(self) -> bool:
        return self.alpha != 0.0

    @property
    def top_k(self) -> int:
        return self.head.k

    @property
    def needed(self) -> bool:
        return self.active

    @property
    def selects_top_k(self) -> bool:
        """It picks the base's top k itself (:func:`_select_top_k`): the chain needs no top-k sampler before it."""
        return True

    @property
    def calls(self) -> int:
        return int(self._context[_CALLS])

    @property
    def error(self) -> BaseException | None:
        code = int(self._context[_ERROR])
        if code == ERROR_WRONG_SIZE:
            return RuntimeError(f"the head expects between {self._context[_TOP_K]} and {self._context[_VOCAB]} "
                                f"candidates, llama.cpp passed {self._context[_GOT]}")
        if code == ERROR_NO_LOGITS:
            return RuntimeError("llama.cpp returned no logits for the last token")
        return None

    def _ring(self, offset: int) -> list[float]:
        kept = min(self.calls, self.keep_times)
        capacity = self.keep_times
        return [float(self._times[offset + (self.calls - kept + i) % capacity]) * 1e-9 for i in range(kept)]

    @property
    def durations(self) -> list[float]:
        """Seconds the head took in each of the latest ``keep_times`` calls, oldest first: reading
        the candidates and raw logits, the head's arithmetic, writing them back (the selection of
        the top k, which llama.cpp's top-k sampler does before the Python callback, not included)."""
        return self._ring(0)

    @property
    def selection_durations(self) -> list[float]:
        """Seconds the choice of the base's top k took in each of the latest ``keep_times`` calls."""
        return self._ring(self.keep_times)

    @property
    def seconds(self) -> float:
        """Seconds of the head's part of the calls still kept (all of them when ``keep_times`` ≥ calls)."""
        return sum(self.durations)

    def adjusted(self) -> None:
        return None

    def attach(self, chain) -> None:
        """Add this sampler to llama-cpp-python's sampler chain ``chain`` (a ``LlamaSampler``),
        registered so that the chain detaches it before it is freed (llama.cpp must not free
        memory Python owns)."""
        import llama_cpp

        interface = llama_cpp.llama_sampler_i()
        interface.apply = llama_cpp.llama_sampler_i_apply(_apply.address)
        sampler = llama_cpp.llama_sampler()
        sampler.iface = ctypes.pointer(interface)
        sampler.ctx = ctypes.c_void_p(int(self._context.ctypes.data))
        self._keep += [interface, sampler]
        llama_cpp.llama_sampler_chain_add(chain.sampler, ctypes.pointer(sampler))
        chain.custom_samplers.append((llama_cpp.llama_sampler_chain_n(chain.sampler) - 1, self))
