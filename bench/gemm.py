"""Integer GEMMs against cuBLAS bf16 at π0.5 and GR00T N1.5 layer shapes, all in one run on one CUDA card.

    python bench/gemm.py --json bench/gemm.json

Per shape: cuBLAS bf16 (torch.matmul), torch._int_mm (int8, weights N x K passed as w.t()),
fp8 row-wise torch._scaled_mm (where the card has fp8), and quantvla_kernels' Triton W8A8,
W4A8 and W4A4 GEMMs on pre-quantized activations (split-K off, and as the autotuner picks
tiles with the split that suits them), plus each whole layer as QuantLinear runs it on CUDA
(per-token quantization + GEMM). Shapes come unfused (k and v alone: 256 output columns) and
fused (q/k/v, gate+up), as the models ran before and after fused projections.
At one shape per distinct (M, K) of the π0.5 expert and prefix and the GR00T DiT, QuantVLA's input
transform (DuQuant: smoothing, Hadamard rotation, permutation, rotation) with int8 quantization:
torch steps + quantize_rows (the unfused path) against the fused Triton kernel.
Every kernel is checked against the exact reference before it is timed; a kernel that fails
is reported and the run goes on. Two medians per row: triton.testing.do_bench, eager (L2
flushed between runs, so weights come from HBM, but Python and launch overhead count), and
do_bench_cudagraph (replayed from a CUDA graph, as a deployed expert loop would run: no launch
overhead, L2 warm). Ceilings are measured in the same run: device-to-device copy bandwidth and
8192³ bf16 / int8 GEMMs. Not a test: it needs a GPU and takes a few minutes, most of them
autotuning. --json is rewritten after every row, so a run cut short by a time limit keeps
what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from quantvla_ros.atomic import write_json_atomic

# name, M, K, N (reference/kernels.md): π0.5 prefix (Gemma 2B, ~968 tokens) and action expert
# (horizon 50 + state, 56 rows); GR00T N1.5 DiT action head (56 rows) and its Qwen3-1.7B backbone.
SHAPES = [
    ("pi05 llm k", 968, 2048, 256),
    ("pi05 llm qkv", 968, 2048, 2560),
    ("pi05 llm o", 968, 2048, 2048),
    ("pi05 llm gate+up", 968, 2048, 32768),
    ("pi05 llm down", 968, 16384, 2048),
    ("pi05 expert k", 56, 1024, 256),
    ("pi05 expert qkv", 56, 1024, 2560),
    ("pi05 expert o", 56, 2048, 1024),
    ("pi05 expert gate+up", 56, 1024, 8192),
    ("pi05 expert down", 56, 4096, 1024),
    ("gr00t dit ff up", 56, 1536, 6144),
    ("gr00t dit ff down", 56, 6144, 1536),
    ("gr00t qwen3 gate+up", 304, 2048, 12288),
    ("gr00t qwen3 down", 304, 6144, 2048),
]
# Shapes that also time the input transform + quantization: K = 1024 and 4096 (π0.5 expert),
# 2048 and 16384 (π0.5 prefix), 1536 and 6144 (GR00T DiT).
TRANSFORM_SHAPES = {
    "pi05 llm gate+up",
    "pi05 llm down",
    "pi05 expert gate+up",
    "pi05 expert down",
    "gr00t dit ff up",
    "gr00t dit ff down",
}
# Fixed tiles for the int32 accumulator checks, so that checking adds no autotuning.
CHECK_CONFIG = {"BM": 64, "BN": 128, "BK": 128, "num_warps": 4, "num_stages": 3}


def bench(fn, args: argparse.Namespace) -> float:
    """Median microseconds of fn(), eager, L2 flushed before each run."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median") * 1e3


def bench_graph(fn, args: argparse.Namespace) -> float | None:
    """Median microseconds of fn() replayed from a CUDA graph, or None if it cannot be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e3
    except RuntimeError as e:
        print(f"  no CUDA graph timing: {str(e).splitlines()[0][:200]}")
        return None


def ceilings(args: argparse.Namespace) -> dict[str, float]:
    n = 8192
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_us = bench(partial(torch.Tensor.copy_, torch.empty_like(src), src), args)
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bf16_us = bench(partial(torch.matmul, a, b), args)
    a8, b8 = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda") for _ in range(2))
    int8_us = bench(partial(torch._int_mm, a8, b8.t()), args)  # column-major B: cuBLASLt's fast path
    return {
        "copy_TBps": 2 * 2**30 / copy_us / 1e6,  # bytes read + written
        "bf16_TFLOPs": 2 * n**3 / bf16_us / 1e6,
        "int8_TOPs": 2 * n**3 / int8_us / 1e6,
    }


class Layer:
    """The QuantLinear attributes quantvla_kernels.quantized_matmul reads, per-channel weight scales."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, w_bits: int, a_bits: int):
        from quantvla_kernels import pack_int4

        self.weight_packed = pack_int4(w_q) if w_bits == 4 else w_q
        self.weight_scale, self.w_bits, self.a_bits = w_scale, w_bits, a_bits
        self.in_features, self.group_size, self.bias, self.input_scale = w_q.shape[1], None, None, None
        self.weight_sum = None  # symmetric activations


def mismatch(what: str, got: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None, or what differs: integers must match exactly, bf16 within one bf16 step."""
    if not got.dtype.is_floating_point:
        bad = (got != ref).sum().item()
        return f"{what}: {bad} of {ref.numel()} integers differ" if bad else None
    err = (got.float() - ref.float()).abs()
    bad = (err > 2**-7 * ref.float().abs()).sum().item() + got.isnan().sum().item()
    return f"{what}: {bad} of {ref.numel()} values differ by more than one bf16 step" if bad else None


class Report:
    """Rows as they are measured, each with its ratio to its shape's bf16 row, written after every row."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.header = path, header
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def add(self, row: dict) -> None:
        base = next((r for r in self.rows if r["shape"] == row["shape"] and r["method"] == "bf16 cuBLAS"), row)
        row["vs_bf16"] = round(base["us"] / row["us"], 3)
        both = None not in (row["us_graph"], base["us_graph"])
        row["vs_bf16_graph"] = round(base["us_graph"] / row["us_graph"], 3) if both else None
        self.rows.append(row)
        self.write()

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.write()

    def write(self) -> None:
        if self.path:
            write_json_atomic(Path(self.path), {**self.header, "rows": self.rows, "failures": self.failures})


class Shape:
    """One layer shape: inputs, quantized weights, and the rows of the table it contributes."""

    def __init__(self, name: str, m: int, k: int, n: int, caps: dict, args: argparse.Namespace, report: Report):
        self.name, self.m, self.k, self.n, self.caps, self.args = name, m, k, n, caps, args
        gen = torch.Generator(device="cuda").manual_seed(m * k + n)
        self.x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
        self.report = report

    def record(
        self, method: str, fn, w_bytes: float, a_bytes: float, int_ops: bool, problem: str | None = None, **extra
    ):
        """Time fn and add a row; a kernel that disagrees with the reference is timed but flagged."""
        us, us_graph = bench(fn, self.args), bench_graph(fn, self.args)
        m, k, n = self.m, self.k, self.n
        tops = 2 * m * k * n / us / 1e6
        tbps = (k * n * w_bytes + m * k * a_bytes + 2 * m * n) / us / 1e6
        peak = self.caps["int8_TOPs"] if int_ops else self.caps["bf16_TFLOPs"]
        self.report.add({
            "shape": self.name, "M": m, "K": k, "N": n, "method": method, "us": round(us, 2),
            "us_graph": None if us_graph is None else round(us_graph, 2),
            "TOPs": round(tops, 1), "compute_frac": round(tops / peak, 3),
            "TBps": round(tbps, 3), "bandwidth_frac": round(tbps / self.caps["copy_TBps"], 3),
            "check": problem or "ok", **extra,
        })  # fmt: skip
        if problem:
            self.report.fail(f"{self.name} {method}: {problem}")

    def record_pass(self, method: str, fn, problem: str | None = None):
        """Time fn, a pass over the activations only (no GEMM): bandwidth from bf16 in, int8 codes out."""
        us, us_graph = bench(fn, self.args), bench_graph(fn, self.args)
        tbps = self.m * self.k * 3 / us / 1e6
        self.report.add({
            "shape": self.name, "M": self.m, "K": self.k, "N": None, "method": method, "us": round(us, 2),
            "us_graph": None if us_graph is None else round(us_graph, 2), "TOPs": None, "compute_frac": None,
            "TBps": round(tbps, 3), "bandwidth_frac": round(tbps / self.caps["copy_TBps"], 3),
            "check": problem or "ok",
        })  # fmt: skip
        if problem:
            self.report.fail(f"{self.name} {method}: {problem}")

    def quantize_weight(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel round-to-nearest codes and scales (QuantLinear adds a clipping search)."""
        qmax = 2 ** (bits - 1) - 1
        scale = (self.w.float().abs().amax(dim=1) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
        return torch.round(self.w.float() / scale[:, None]).clamp(-qmax - 1, qmax).to(torch.int8), scale

    def baselines(self) -> None:
        from quantvla_kernels import quantize_per_token

        x, w = self.x, self.w
        self.record("bf16 cuBLAS", partial(torch.matmul, x, w.t()), 2, 2, False)
        if self.m > 16:  # cuBLAS's _int_mm needs M > 16
            a8, w8 = quantize_per_token(x, 8)[0], self.quantize_weight(8)[0]
            self.record("int8 torch._int_mm", partial(torch._int_mm, a8, w8.t()), 1, 1, True)
        fp8 = torch.float8_e4m3fn
        xs = (x.float().abs().amax(dim=1, keepdim=True) / torch.finfo(fp8).max).clamp(min=1e-12)
        ws = (w.float().abs().amax(dim=1, keepdim=True) / torch.finfo(fp8).max).clamp(min=1e-12)
        fn = partial(
            torch._scaled_mm, (x.float() / xs).to(fp8), (w.float() / ws).to(fp8).t(),
            scale_a=xs, scale_b=ws.t().contiguous(), out_dtype=torch.bfloat16,
        )  # fmt: skip
        try:
            fn()
        except RuntimeError as e:
            print(f"  {self.name}: no fp8 row-wise _scaled_mm on this card ({str(e).splitlines()[0]})")
            return
        self.record("fp8 rowwise _scaled_mm", fn, 1, 1, True)

    def ours(self, label: str, w_bits: int, a_bits: int) -> None:
        from quantvla_kernels import int_matmul, quantize_per_token, quantized_matmul, scaled_int_matmul
        from quantvla_kernels import triton_gemm as tg
        from quantvla_kernels import triton_quant as tq

        w_q, w_scale = self.quantize_weight(w_bits)
        layer = Layer(w_q, w_scale, w_bits, a_bits)
        a_q, a_scale = quantize_per_token(self.x, a_bits)
        ref = scaled_int_matmul(a_q, a_scale, w_q, w_scale, None, None, torch.bfloat16)
        ref_acc = int_matmul(a_q, w_q)
        got_q, got_scale, _ = tq.quantize_rows(self.x, a_bits)
        quant_problem = mismatch("quantize_rows codes", got_q, a_q) or mismatch(
            "quantize_rows scales", got_scale, a_scale
        )

        # The raw accumulator with split-K forced on, repeatedly: its cross-CTA reduction could race.
        for _ in range(5):
            acc = tg.int_gemm(a_q, layer.weight_packed, w_bits, 4, config=CHECK_CONFIG)
            quant_problem = quant_problem or mismatch("int32 accumulator (split-K 4)", acc, ref_acc)
        sms = torch.cuda.get_device_properties(self.x.device).multi_processor_count
        # split_k None: the autotuner times each tile shape with the split split_k_for gives it.
        for split_k in (1, None):
            method = f"{label} triton" + (" split-K off" if split_k == 1 else "")
            gemm = partial(
                tg.scaled_int_gemm, a_q, a_scale, layer.weight_packed, w_scale, w_bits, None, None, torch.bfloat16,
                split_k,
            )  # fmt: skip
            y = gemm()  # the first call autotunes
            problem = quant_problem or mismatch("output", y, ref)
            tiles = tg._tuned.best_config.kwargs
            used = split_k or tg.split_k_for(tg.m_bucket(self.m), self.n, self.k, 0, tiles["BM"], tiles["BN"], sms)
            # bit_identical is expected with per-channel scales: the epilogue rounds like the reference (no FMA).
            self.record(
                method, gemm, w_bits / 8, 1, True, problem, bit_identical=torch.equal(y, ref),
                config=str(tg._tuned.best_config), split_k=used,
            )  # fmt: skip

        layer_fn = partial(quantized_matmul, self.x, layer, torch.bfloat16)
        problem = quant_problem or mismatch("quantized_matmul", layer_fn(), ref)
        self.record(f"{label} layer (quant + GEMM)", layer_fn, w_bits / 8, 2, True, problem)

    def transform(self) -> None:
        """DuQuant transform + per-token int8 quantization: torch steps then quantize_rows, and the fused kernel."""
        from quantvla_kernels import quantize_per_token
        from quantvla_kernels import triton_quant as tq
        from quantvla_kernels import triton_transform as tt
        from quantvla_ros.quant.transforms import duquant

        t = duquant(self.w, self.x.float().abs().amax(dim=0), smooth_alpha=0.5)
        ref_q, ref_scale = quantize_per_token(t.apply(self.x.float()), 8)

        def check(fn) -> str | None:
            q, scale, _ = fn()
            return mismatch("codes", q, ref_q) or mismatch("scales", scale, ref_scale)

        def unfused() -> tuple[torch.Tensor, torch.Tensor, None]:
            # As QuantLinear runs a layer on CUDA without fusion: float32 x, the torch transform, quantize_rows.
            return tq.quantize_rows(t.apply(self.x.float()), 8)

        self.record_pass("A8 transform torch + quant", unfused, check(unfused))
        steps = (t.smooth, t.rotation1_signs, t.perm, t.rotation2_signs)
        fused = partial(tt.transform_quantize_rows, self.x, 8, *steps)
        self.record_pass("A8 transform+quant fused", fused, check(fused))

    def run(self) -> None:
        self.baselines()
        for label, w_bits, a_bits in (("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A4", 4, 4)):
            self.guarded(label, partial(self.ours, label, w_bits, a_bits))
        if self.name in TRANSFORM_SHAPES:
            self.guarded("transform", self.transform)

    def guarded(self, label: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # one broken kernel must not cost the rest of a scarce GPU run
            self.report.fail(f"{self.name} {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"  {self.report.failures[-1]}")


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'shape':<22}{'M x K x N':>19}  {'method':<30}{'us':>8}{'x bf16':>8}{'graph us':>9}{'x bf16':>8}"
        f"{'TOP/s':>7}{'%peak':>6}{'TB/s':>6}{'%bw':>5}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        dims = f"{r['M']}x{r['K']}" + ("" if r["N"] is None else f"x{r['N']}")
        flag = "" if r["check"] == "ok" else "  FAIL " + r["check"]
        graph = "-" if r["us_graph"] is None else f"{r['us_graph']:.1f}"
        graph_ratio = "-" if r["vs_bf16_graph"] is None else f"{r['vs_bf16_graph']:.2f}"
        tops = "-" if r["TOPs"] is None else f"{r['TOPs']:.0f}"
        peak = "-" if r["compute_frac"] is None else f"{100 * r['compute_frac']:.0f}"
        print(
            f"{r['shape']:<22}{dims:>19}  {r['method']:<30}{r['us']:>8.1f}{r['vs_bf16']:>8.2f}"
            f"{graph:>9}{graph_ratio:>8}"
            f"{tops:>7}{peak:>6}{r['TBps']:>6.2f}{100 * r['bandwidth_frac']:>5.0f}{flag}"
        )
    print(
        "us: eager, L2 flushed; graph us: CUDA graph replay. TOP/s, TB/s from the eager time; %peak: of the 8192³\n"
        "int8 _int_mm (integer kernels) or bf16 GEMM (bf16); %bw: of device-to-device copy bandwidth.\n"
        "M x K rows: the input transform + activation quantization alone (x bf16: the shape's bf16 GEMM time over\n"
        "this row's; TB/s counts bf16 in and int8 out only)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures, card and date to this file (after every row)")
    parser.add_argument("--shapes", help="comma-separated substrings of shape names to run (default: all)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench timed repetitions, ms")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench/gemm.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine.")
    try:
        import triton
    except ModuleNotFoundError:
        sys.exit("bench/gemm.py: triton is not installed; install the pin in requirements.txt.")

    start = time.time()
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}")
    caps = ceilings(args)
    print(
        f"ceilings: copy {caps['copy_TBps']:.2f} TB/s, bf16 {caps['bf16_TFLOPs']:.0f} TFLOP/s, "
        f"int8 _int_mm {caps['int8_TOPs']:.0f} TOP/s (8192³)"
    )
    header = {
        "card": card, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": triton.__version__, "ceilings": caps,
    }  # fmt: skip
    report = Report(args.json, header)
    wanted = [s.strip() for s in args.shapes.split(",")] if args.shapes else None
    for name, m, k, n in SHAPES:
        if wanted and not any(w in name for w in wanted):
            continue
        t0 = time.time()
        Shape(name, m, k, n, caps, args, report).run()
        print(f"  {name} {m}x{k}x{n}: {time.time() - t0:.0f} s")

    print_table(report.rows)
    print(f"total {time.time() - start:.0f} s")
    if args.json:
        print(f"wrote {args.json}")
    if report.failures:
        sys.exit("bench/gemm.py: kernels that disagree with the reference or failed:\n" + "\n".join(report.failures))


if __name__ == "__main__":
    main()
