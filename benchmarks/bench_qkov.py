"""QK-OV heatmap: vectorised ``compute_heatmap`` against the seeds' per-pair Python loop.

Setup (DESIGN section 5 budget: full heatmap, 4 blocks, n_i = n_j = 32, 12 layers x 12 heads, >= 100x
faster than the seeds' loop): a GPT-2-shaped model with 12 layers and 12 heads (``--n-embd``, default
192, head_dim 16), and 32 stored samples per task: random per-sample gradients of the right shapes
given to a real :class:`~fisher_callbacks.fisher.FisherCollector` through ``add_gradients``.

The seeds' loop, for every pair (i, j), layer, head and block, slices ``C_i``, ``g_j`` and ``I`` with
``layout.head_slice``, divides, multiplies and sums (``.item()`` per score). It is timed on
``--loop-pairs`` pairs and extrapolated linearly to all ``n_i * n_j`` pairs (its cost per pair is
constant; ``--loop-pairs 1024`` runs it in full). Its scores are checked against the heatmap's.

Peak memory: the high-water marks, above their levels just before the call, of the bytes malloc has
handed out (glibc ``mallinfo2``) and of the process RSS, sampled every 0.5 ms by a thread (torch CPU
allocations are invisible to tracemalloc), plus ``torch.cuda.max_memory_allocated`` on a GPU.

Both sides run in the same process with the same torch threads (``--threads``, default 1: on a
shared CPU machine intra-op threads spin against other processes and make timings erratic; 0 uses
torch's default). Each side's best time is used (the least disturbed run).

Run: ``python benchmarks/bench_qkov.py [--n-embd 192] [--loop-pairs 16] [--threads 1]
[--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.interference import QKOVInterferenceMetric
from fisher_callbacks.layouts import BLOCKS, AttentionLayout

BUDGET = 100.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):  # not glibc >= 2.33: RSS only
    _LIBC = None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _heap() -> int:
    """Bytes malloc has handed out and not freed (main arena + mmapped chunks); 0 if unknown."""
    if _LIBC is None:
        return 0
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Context manager: peaks of RSS and of malloc'd bytes above their levels at entry.

    Sampled every ``interval`` seconds by a thread (torch CPU tensors are invisible to
    tracemalloc). RSS alone under-reports: freed pages the allocator kept are reused silently.
    """

    def __init__(self, interval: float = 5e-4) -> None:
        self.interval = interval
        self.rss = 0
        self.heap = 0

    def _sample(self) -> None:
        self.rss = max(self.rss, _rss() - self._rss0)
        self.heap = max(self.heap, _heap() - self._heap0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._rss0, self._heap0 = _rss(), _heap()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def build(n_embd: int, n_samples: int, seed: int = 0):
    """12x12 GPT-2-shaped model, layout and a collector holding two tasks of random gradients."""
    config = AutoConfig.for_model("gpt2", n_layer=12, n_head=12, n_embd=n_embd, n_positions=32, vocab_size=61)
    model = AutoModelForCausalLM.from_config(config).eval()
    layout = AttentionLayout.from_model(model)
    collector = FisherCollector(model, layout=layout, max_samples_per_task=n_samples)
    need_mb = 2 * n_samples * collector.bytes_per_sample / 2**20
    collector.gradient_memory_mb = 1.05 * need_mb + 1
    gen = torch.Generator().manual_seed(seed)
    for task, offset in (("math", 1000), ("general", 5000)):
        # heteroscedastic entries, a per-task mean, added in small batches (low peak memory)
        scale = {n: 1e-3 * (torch.rand(s, generator=gen) + 0.1) for n, s in layout.param_shapes.items()}
        for start in range(0, n_samples, 8):
            b = min(8, n_samples - start)
            grads = {n: sc * torch.randn(b, *sc.shape, generator=gen) for n, sc in scale.items()}
            ids = [offset + 7 * (start + k) for k in range(b)]  # true ids, not 0..n-1
            collector.add_gradients(grads, task, sample_ids=ids)
    return model, layout, collector


def seeds_loop(layout, collector, task_a, task_b, pairs, epsilon=1e-10, ridge_lambda=1e-8):
    """The predecessor's per-pair loop over (pair, layer, head, block): {(i, j, l, h, b): score}."""
    ids_a, _ = collector.stored_gradients(task_a)
    ids_b, _ = collector.stored_gradients(task_b)
    fisher = collector.fisher(task_a)
    out = {}
    for i, j in pairs:
        contrib = {n: g.float() ** 2 for n, g in collector.get_gradient(task_a, ids_a[i]).items()}
        grad_j = collector.get_gradient(task_b, ids_b[j])
        for layer in range(layout.num_layers):
            names = layout.param_names(layer)
            for head in range(layout.num_heads):
                for block in BLOCKS:
                    name = names[block]
                    c = layout.head_slice(contrib[name], layer, head, block)
                    g = layout.head_slice(grad_j[name], layer, head, block).float()
                    fi = layout.head_slice(fisher[name], layer, head, block)
                    score = (c / (fi.clamp_min(epsilon) + ridge_lambda) * g.abs()).sum().item()
                    out[(i, j, layer, layout.block_head(head, block), block)] = score
    return out


def time_heatmap(metric, repeats: int):
    """Best and median wall time, and memory peaks (max over repeats), of ``compute_heatmap``."""
    metric.compute_heatmap("math", "general")  # warm-up
    times, rss, heap = [], 0, 0
    hm = None
    for _ in range(repeats):
        if metric.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            hm = metric.compute_heatmap("math", "general")
            if metric.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rss, heap = max(rss, mem.rss), max(heap, mem.heap)
    gpu_peak = torch.cuda.max_memory_allocated() if metric.device.type == "cuda" else None
    return min(times), statistics.median(times), rss, heap, gpu_peak, hm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--loop-pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-permutations", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (0: torch's default; on a shared machine "
        "spinning OpenMP threads make both timings erratic, so 1 is the reproducible default)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    _, layout, collector = build(args.n_embd, args.samples)
    n = args.samples
    per_sample_mb = collector.bytes_per_sample / 2**20
    print(
        f"model: GPT-2 shape, {layout.num_layers} layers x {layout.num_heads} heads, "
        f"n_embd={args.n_embd} (head_dim {layout.head_dim}); {n} + {n} stored samples, "
        f"{per_sample_mb:.2f} MB each ({collector.stored_bytes / 2**20:.0f} MB stored); "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )

    fast = QKOVInterferenceMetric(layout, collector, computation_device=args.device, run_stats=False)
    fast_res = time_heatmap(fast, args.repeats)
    hm = fast_res[-1]
    full = QKOVInterferenceMetric(
        layout, collector, computation_device=args.device, n_permutations=args.n_permutations
    )
    stats_res = time_heatmap(full, max(1, args.repeats // 2))

    # The loop is timed in groups of pairs; the fastest group's rate is extrapolated (the
    # machine may be shared: the best rate is the least disturbed one, as for the heatmap).
    pairs_all = [(i, j) for i in range(n) for j in range(n)]
    step = max(1, len(pairs_all) // max(1, args.loop_pairs))
    pairs = pairs_all[::step][: args.loop_pairs]
    group = max(1, len(pairs) // 4)
    loop, rates = {}, []
    t_loop_part = 0.0
    for g0 in range(0, len(pairs), group):
        chunk = pairs[g0 : g0 + group]
        t0 = time.perf_counter()
        loop.update(seeds_loop(layout, collector, "math", "general", chunk))
        dt = time.perf_counter() - t0
        t_loop_part += dt
        rates.append(dt / len(chunk))
    t_loop = min(rates) * len(pairs_all)
    worst = 0.0
    for (i, j, layer, h, block), score in loop.items():
        got = float(hm[block]["scores"][i, j, layer, h])
        worst = max(worst, abs(got - score) / max(abs(score), 1e-30))

    evals = len(pairs_all) * layout.num_layers * layout.num_heads * len(BLOCKS)
    extrapolated = "measured" if len(pairs) == len(pairs_all) else "extrapolated linearly"
    print(
        f"seeds' per-pair loop: {len(pairs)} of {len(pairs_all)} pairs in {t_loop_part:.2f} s "
        f"(best group {min(rates) * 1e3:.0f} ms/pair) -> {t_loop:.1f} s for all {evals} "
        f"(pair, layer, head, block) scores ({extrapolated}); max rel. diff vs heatmap {worst:.1e}"
    )

    def line(label, res, budget: bool):
        best, median, rss, heap, gpu, _ = res
        ratio = t_loop / best
        verdict = f" (budget >= {BUDGET:.0f}x: {'PASS' if ratio >= BUDGET else 'FAIL'})"
        gpu_txt = f", GPU peak {gpu / 2**20:.0f} MiB" if gpu is not None else ""
        print(
            f"{label}: best {best * 1e3:.0f} ms, median {median * 1e3:.0f} ms; speed-up "
            f"{ratio:.0f}x vs loop{verdict if budget else ''}; peak memory above entry: "
            f"malloc +{heap / 2**20:.0f} MiB, RSS +{rss / 2**20:.0f} MiB{gpu_txt}"
        )

    line("compute_heatmap, stats off", fast_res, budget=True)
    line(
        f"compute_heatmap, stats on ({args.n_permutations} permutations, BY; the loop has no "
        "stats, ratio for information)",
        stats_res,
        budget=False,
    )
    scores_mb = sum(r["scores"].numel() * 4 for r in hm.values()) / 2**20
    print(
        f"(output scores {scores_mb:.1f} MiB; {collector.stored_bytes / 2**20:.0f} MiB of stored "
        "gradients are read one (layer, block) at a time, chunked to max_chunk_elements)"
    )


if __name__ == "__main__":
    main()
