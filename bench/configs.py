"""The benchmark matrix: shapes, named sets, spec strings and FLOP counts.

A Shape is one nn.LSTM configuration plus the input size (B, T). The matrix
is Shape x dtype x mode; a Shape may restrict its modes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("inference", "training")
# "tf32" is fp32 tensors with TF32 math allowed for both sides (GPU only);
# "fp32" on a GPU means TF32 off for both sides.
DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp64")


@dataclass(frozen=True)
class Shape:
    T: int
    B: int
    I: int
    H: int
    L: int = 1
    bidir: bool = False
    proj: int = 0
    # One LSTMCell stepped T times in a Python loop (torch.nn.LSTMCell vs lstm_fast's)
    # instead of one LSTM call over the sequence: the per-call cost users of cells pay.
    cell: bool = False
    # The LSTM fed one time step per call, its state carried from call to call, T calls
    # in a Python loop (streaming use): the per-call cost of the LSTM module itself.
    steps: bool = False
    # Variable-length batch (bench/varlen.py): "" dense; "padded" the padded call on the
    # full [T, B, I]; "packed" a PackedSequence; "lengths" padded input with lengths=.
    # The lengths are uniform in [T // 10, T], the same draw for every runner.
    varlen: str = ""
    # A recurrent regulariser, "name=p" (recurrent_dropout=0.25, zoneout=0.1): lstm_fast.LSTM
    # with that option against an nn.LSTMCell Python loop drawing the same kind of masks.
    reg: str = ""
    modes: tuple = MODES
    tags: tuple = field(default=(), compare=False)

    def __post_init__(self):
        if self.cell and (self.L != 1 or self.bidir or self.proj):
            raise ValueError(f"a cell config is one layer, one direction, no projection: {self}")
        if self.cell and self.steps:
            raise ValueError(f"cell and steps are two kinds of loop; choose one: {self}")

    @property
    def name(self) -> str:
        s = f"T{self.T} B{self.B} I{self.I} H{self.H}"
        if self.L != 1:
            s += f" L{self.L}"
        if self.bidir:
            s += " bi"
        if self.proj:
            s += f" P{self.proj}"
        if self.cell:
            s += " cell"
        if self.steps:
            s += " steps"
        if self.varlen:
            s += f" varlen-{self.varlen}"
        if self.reg:
            s += f" {self.reg}"
        return s

    @property
    def family(self) -> str:
        """The shape without its sizes I and H: points of one hidden-size sweep share it."""
        return (f"T{self.T} B{self.B} L{self.L}{' bi' if self.bidir else ''}{' proj' if self.proj else ''}"
                f"{' cell' if self.cell else ''}{' steps' if self.steps else ''}{' varlen' if self.varlen else ''}")


def S(T, B, H, I=None, L=1, bidir=False, proj=0, cell=False, steps=False, varlen="", reg="", modes=MODES, tags=()):
    return Shape(T=T, B=B, I=H if I is None else I, H=H, L=L, bidir=bidir, proj=proj, cell=cell, steps=steps,
                 varlen=varlen, reg=reg, modes=tuple(modes), tags=tuple(tags))


VARLEN_KINDS = ("padded", "packed", "lengths")


# The configurations the project's speed claims are made on (CPU).
REFERENCE_CPU = [
    S(100, 32, 256, tags=("reference",)),
    S(200, 8, 128, modes=("training",), tags=("reference",)),
    S(100, 1, 128, tags=("reference",)),
]
# Hidden-size sweep for the plot; T and B small enough for the 3-minute quick run on 2 cores.
SWEEP_CPU = [S(50, 16, h, tags=("sweep",)) for h in (64, 128, 256, 512)]
STACKED_CPU = [S(50, 16, 128, L=2, bidir=True)]
# LSTMCell stepped in a Python loop: a tiny cell (per-call overhead), a mid-size and a
# large one (the fused step's work).
CELL_CPU = [S(50, 1, 64, cell=True), S(50, 8, 256, cell=True), S(50, 32, 512, cell=True)]
# The fixed cost of a call (bench/NOTES_latency.md): B=1 and H=8, where the arithmetic is
# negligible, for one LSTMCell step, one LSTM call at T=1 and T=100, and 100 one-step LSTM
# calls with carried state; then the sizes the one-step speed claims are made on.
LATENCY_CPU = [
    S(1, 1, 8, cell=True, tags=("fixed-cost",)), S(1, 1, 8, tags=("fixed-cost",)),
    S(100, 1, 8, cell=True, tags=("fixed-cost",)), S(100, 1, 8, steps=True, tags=("fixed-cost",)),
    S(100, 1, 8, tags=("fixed-cost",)),
    S(50, 1, 64, cell=True), S(50, 1, 256, cell=True), S(50, 8, 512, cell=True), S(50, 32, 512, cell=True),
    S(50, 1, 256, steps=True), S(100, 1, 128, modes=("inference",)),
]
# Variable-length batches: the same sizes padded, packed and with lengths= side by side.
VARLEN_CPU = [S(100, 32, 256, varlen=v, tags=("varlen",)) for v in VARLEN_KINDS]
VARLEN_EXTRA_CPU = [S(200, 16, 128, L=2, bidir=True, varlen=v, tags=("varlen",)) for v in VARLEN_KINDS]
EXTRA_CPU = [
    S(100, 32, 1024, tags=("sweep-large",)),
    S(100, 64, 256),
    S(100, 32, 256, L=2),
    S(100, 32, 512, proj=128),
    S(400, 4, 64),
]

# GPU: the sweep at B=64 with H and I multiples of 128 also hits cuDNN's
# persistent fp16 fast path (one layer, one direction, B multiple of 8 <= 128).
SWEEP_GPU = [S(256, 64, h, tags=("sweep",)) for h in (128, 256, 512, 1024, 2048)]
LATENCY_GPU = [S(1024, 1, 256), S(512, 8, 512)]
THROUGHPUT_GPU = [S(128, 256, 1024)]
STACKED_GPU = [S(256, 64, 512, L=4), S(256, 64, 512, L=2, bidir=True), S(256, 64, 1024, proj=256)]

# The H200 run (bench/gpu_run.sh), two invocations because cli takes one dtype list:
#   flashrnn-gpu    --dtype fp16,bf16,tf32,fp32: FlashRNN's published H100 comparison, B=16, I=H=768, T=1024
#   h200-sweep-gpu  --dtype bf16,fp32: B in {16, 64} x H in {1024, 256, 512}, T=1024, I=H
# Each is run in both modes, shapes in the order listed; a budgeted run skips what it does not reach.
# Estimate per call (ms), from cuDNN's usual speed: a step costs max(~8 us latency, 8*B*H^2 / small-M
# GEMM rate: ~150 TFLOP/s bf16/fp16, ~80 tf32, ~25 fp32) plus the input GEMM 8*B*T*H*I at ~600 / 300 /
# 50 TFLOP/s; training 3x. cuda: >= 10 us a step (a cuBLAS GEMM and a kernel launched per step);
# triton: >= 25 us a step (a Python loop of Triton launches), backward about 1.2x forward; the GEMM
# floor: >= 6 us a step (one torch.mm launch).
#                                  inference (ms)             training (ms)
#   rows                          cudnn cuda triton floor  row_s   cudnn cuda triton floor  row_s
#   B16 H768 fp16, bf16, tf32         8   10     26     6   0.7      25   23     57    19   1.7
#   B16 H768 fp32                    10   12     27     8   0.8      29   27     61    23   1.9
#   sweep bf16 (every B, H)         8-9 10-11 26-27  6-7   0.7   25-27 23-25  56-59 19-21 1.7-1.8
#   sweep fp32 but B64 H1024       8-11 10-13 26-28  6-9 0.7-0.8 25-33 23-31  57-65 19-27 1.7-2.1
#   B64 H1024 fp32                   33   33     37    33   1.8      99   81     89    99   5.0
# row_s: 14 calls of each runner (2 warm-up, 1 estimate, 1 memory, 10 repeats) and 12 of the floor;
# a tight budget cuts repeats to 3 (half of that). All 32 rows: ~44 s of calls, ~10 s of module set-up,
# ~2 x 10 s for two process starts and matmul rates; plus Triton's autotuning on the first call of each
# of the 16 (shape, dtype) pairs: ~2-3 s each from a warm cache (gpu_run.sh compiles the kernels beside
# the build), 15-27 s each cold (8-15 configs compiled at ~1.5 s). So ~130 s with the warm cache, all of
# it about fits the ~140 s gpu_run.sh leaves (the last sweep pairs may be skipped); cold, only
# flashrnn-gpu and 2-3 sweep pairs would fit. Repeats adapt upward to fill the budget.
FLASHRNN_GPU = [S(1024, 16, 768, tags=("flashrnn",))]
# H=1024 and 256 first: the two ends of the sweep; B=16 (FlashRNN's batch) before 64 at each H.
H200_SWEEP_GPU = [S(1024, b, h, tags=("sweep",)) for h in (1024, 256, 512) for b in (16, 64)]

# Training with each regulariser, and the same call without (its first row): the cost of the
# masks inside the fused loop, and the speed against a torch LSTMCell loop doing the same.
REGULARISERS_CPU = [S(100, 32, 256, modes=("training",), reg=r, tags=("regularisers",))
                    for r in ("", "recurrent_dropout=0.25", "zoneout=0.1")]

NAMED = {
    "regularisers": REGULARISERS_CPU,
    "reference": REFERENCE_CPU,
    "sweep": SWEEP_CPU,
    "stacked": STACKED_CPU,
    "extra": EXTRA_CPU,
    "varlen": VARLEN_CPU + VARLEN_EXTRA_CPU,
    "quick-cpu": REFERENCE_CPU + SWEEP_CPU + STACKED_CPU + VARLEN_CPU,
    "full-cpu": REFERENCE_CPU + SWEEP_CPU + STACKED_CPU + VARLEN_CPU + VARLEN_EXTRA_CPU + EXTRA_CPU,
    "sweep-gpu": SWEEP_GPU,
    "quick-gpu": [SWEEP_GPU[1], SWEEP_GPU[3], LATENCY_GPU[0], STACKED_GPU[1]],
    "full-gpu": SWEEP_GPU + LATENCY_GPU + THROUGHPUT_GPU + STACKED_GPU,
    "flashrnn-gpu": FLASHRNN_GPU,
    "h200-sweep-gpu": H200_SWEEP_GPU,
    "cell": CELL_CPU,
    "latency": LATENCY_CPU,
    "tiny": [S(8, 4, 32), S(8, 4, 32, L=2, bidir=True), S(4, 2, 16, cell=True)],  # smoke tests of the harness
}


def default_set(device: str, quick: bool) -> str:
    return f"{'quick' if quick else 'full'}-{'gpu' if device == 'cuda' else 'cpu'}"


def default_dtypes(device: str, quick: bool) -> list[str]:
    if device == "cuda":
        return ["fp32", "fp16"] if quick else ["tf32", "fp32", "fp16", "bf16"]
    return ["fp32"]


_KEYS = {"t": "T", "b": "B", "i": "I", "h": "H", "l": "L", "layers": "L", "num_layers": "L",
         "bi": "bidir", "bidir": "bidir", "bidirectional": "bidir", "p": "proj", "proj": "proj",
         "proj_size": "proj", "modes": "modes", "mode": "modes", "cell": "cell", "steps": "steps",
         "varlen": "varlen"}


def parse_spec(spec: str) -> list[Shape]:
    """'T=100,B=32,H=256[,I=..,L=2,bi=1,proj=64,cell=1,varlen=packed,modes=training]' items separated by ';'.

    I defaults to H; modes is '+'-separated (training+inference).
    """
    shapes = []
    for item in spec.split(";"):
        item = item.strip()
        if not item:
            continue
        kw = {}
        for part in item.split(","):
            if "=" not in part:
                raise ValueError(f"bad config item {part!r} in {item!r}: want key=value")
            k, v = (s.strip() for s in part.split("=", 1))
            key = _KEYS.get(k.lower())
            if key is None:
                raise ValueError(f"unknown config key {k!r}; known: {', '.join(sorted(set(_KEYS)))}")
            if key == "modes":
                modes = tuple(m for m in v.split("+") if m)
                bad = [m for m in modes if m not in MODES]
                if bad:
                    raise ValueError(f"unknown mode(s) {bad}; choose from {MODES}")
                kw[key] = modes
            elif key in ("bidir", "cell", "steps"):
                kw[key] = v.lower() in ("1", "true", "yes", "y")
            elif key == "varlen":
                if v not in VARLEN_KINDS:
                    raise ValueError(f"unknown varlen kind {v!r}; choose from {VARLEN_KINDS}")
                kw[key] = v
            else:
                kw[key] = int(v)
        missing = {"T", "B", "H"} - set(kw)
        if missing:
            raise ValueError(f"config {item!r} lacks {', '.join(sorted(missing))}")
        shapes.append(S(**kw))
    return shapes


def resolve_configs(arg: str | None, device: str, quick: bool) -> list[Shape]:
    """Named sets (joined by ',' or '+') and/or spec strings, separated by spaces."""
    if not arg:
        arg = default_set(device, quick)
    shapes: list[Shape] = []
    for token in arg.split():
        if "=" in token:
            shapes += parse_spec(token)
            continue
        for name in token.replace("+", ",").split(","):
            if not name:
                continue
            if name not in NAMED:
                raise ValueError(f"unknown config set {name!r}; named sets: {', '.join(NAMED)} "
                                 f"(or a spec like 'T=100,B=32,H=256;T=50,B=1,H=128')")
            shapes += NAMED[name]
    seen, unique = set(), []
    for s in shapes:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def cudnn_persistent(shape: Shape, dtype: str) -> bool:
    """Whether cuDNN can take its fast persistent algorithm (its documented conditions): fp16, one layer,
    one direction, no projection, H <= 1024, H and I multiples of 128, B a multiple of 8 and <= 128."""
    return (dtype == "fp16" and shape.L == 1 and not shape.bidir and not shape.proj and shape.H <= 1024
            and shape.H % 128 == 0 and shape.I % 128 == 0 and shape.B % 8 == 0 and shape.B <= 128)


def lstm_flops(shape: Shape, mode: str) -> float:
    """Matmul FLOPs of one call of the whole module (input projections included).

    Per layer-direction forward: 8*B*T*H*(I_l + P) for the input and recurrent
    GEMMs (P = proj or H), plus 2*B*T*H*P for the projection; I_l is the
    layer's input width (I, then P * directions). Training (forward +
    backward) counts 3x forward: backward does two GEMMs per forward GEMM.
    Elementwise gate math is not counted.
    """
    P = shape.proj or shape.H
    D = 2 if shape.bidir else 1
    total = 0
    for layer in range(shape.L):
        width = shape.I if layer == 0 else P * D
        per = 8 * shape.B * shape.T * shape.H * (width + P)
        if shape.proj:
            per += 2 * shape.B * shape.T * shape.H * P
        total += D * per
    return float(total * (3 if mode == "training" else 1))
