"""Loss parity on real text: 32-bit AdamW vs 8-bit AdamW on a byte-level language model.

A small GPT-style byte-level transformer is trained on the Python standard library's own
sources (text that ships with every Python; read in sorted file order, so every run sees the
same bytes) twice, from the same initial weights on the same batches:

* ``torch.optim.AdamW`` (32-bit state), and
* ``bnbfuse.optim.AdamW8bit`` (8-bit blockwise state) with the embeddings kept in 32-bit state
  through ``bnbfuse.optim.keep_32bit_embeddings``.

The held-out loss (bytes from files the model never trained on) of the 8-bit run must be
within ``--tol`` (default 1%) of the 32-bit run; the script prints both, writes JSON and a PNG
of both loss curves, and exits with status 1 when the check fails.

Usage::

    python benchmarks/train_parity.py               # 0.88M params, 1000 steps
    python benchmarks/train_parity.py --steps 400 --also bitsandbytes8
    python benchmarks/train_parity.py --ci          # tiny model, seconds (what the tests run)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.ensure_bnbfuse_importable()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FULL = dict(d_model=128, layers=4, heads=4, seq_len=128, batch_size=16, steps=1000, lr=2e-3,
            warmup=40, eval_every=50, eval_batches=16, train_bytes=4_000_000, eval_bytes=300_000)
CI = dict(d_model=64, layers=1, heads=2, seq_len=64, batch_size=8, steps=30, lr=3e-3,
          warmup=5, eval_every=10, eval_batches=4, train_bytes=200_000, eval_bytes=40_000)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """Pre-LayerNorm decoder over the 256 byte values with learned positions."""

    def __init__(self, d_model: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(256, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def load_bytes(cfg: dict):
    train = _common.stdlib_text(cfg["train_bytes"])
    # Held-out text starts one megabyte after the training text: other files entirely.
    held = _common.stdlib_text(cfg["eval_bytes"], skip_bytes=cfg["train_bytes"] + 1_000_000)
    as_ids = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_ids(train), as_ids(held)


def batches(data: torch.Tensor, n: int, B: int, T: int, seed: int) -> torch.Tensor:
    """``n`` batches of ``B`` windows of ``T + 1`` bytes at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - T - 1, (n, B), generator=g)
    return data[starts.unsqueeze(-1) + torch.arange(T + 1)]


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


def make_optimizer(kind: str, model: nn.Module, lr: float):
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if kind == "adamw32":
        return torch.optim.AdamW(model.parameters(), **kw)
    if kind == "bnbfuse8":
        import bnbfuse
        bnbfuse.optim.keep_32bit_embeddings(model)
        return bnbfuse.optim.AdamW8bit(model.parameters(), **kw)
    if kind == "bitsandbytes8":
        import bitsandbytes as bnb
        mng = bnb.optim.GlobalOptimManager.get_instance()
        params = list(model.parameters())
        mng.register_parameters(params)
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                mng.override_config(m.weight, "optim_bits", 32)
        return bnb.optim.AdamW8bit(params, **kw)
    raise ValueError(f"unknown optimizer {kind!r}")


def train(kind: str, cfg: dict, train_b: torch.Tensor, eval_b: torch.Tensor, seed: int, show: bool) -> dict:
    torch.manual_seed(seed)
    model = ByteLM(cfg["d_model"], cfg["layers"], cfg["heads"], cfg["seq_len"])
    opt = make_optimizer(kind, model, cfg["lr"])
    warm, steps = cfg["warmup"], cfg["steps"]
    # Linear warm-up then cosine decay to 10%: the schedule a real run uses.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else
        0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))

    def held_out():
        model.eval()
        with torch.no_grad():
            val = statistics.fmean(lm_loss(model, eval_b[i]).item() for i in range(eval_b.shape[0]))
        model.train()
        return val

    curve, evals, times = [], [], []
    for step in _common.progress(range(steps), total=steps, desc=kind, disable=not show):
        t0 = time.perf_counter()
        loss = lm_loss(model, train_b[step])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
        curve.append(loss.item())
        if not math.isfinite(curve[-1]):
            raise RuntimeError(f"{kind}: loss became {curve[-1]} at step {step}")
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            evals.append((step + 1, held_out()))
    state_bytes = _common.tensor_bytes(list(opt.state.values()))
    return dict(optimizer=kind, train_loss=curve, eval_curve=evals, final_eval_loss=evals[-1][1],
                step_time_s=statistics.median(times), optimizer_state_bytes=state_bytes,
                params=sum(p.numel() for p in model.parameters()))


def plot(runs: list[dict], path: Path, title: str) -> bool:
    if not _common.have_matplotlib():
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return False
    plt = _common.pyplot()
    fig, (ax, gap) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]})
    ref = dict(runs[0]["eval_curve"])
    for r, color in zip(runs, ("#4c72b0", "#dd8452", "#55a868")):
        tl = r["train_loss"]
        k = max(1, len(tl) // 50)  # smooth the noisy per-batch curve for reading
        smooth = [statistics.fmean(tl[max(0, i - k + 1):i + 1]) for i in range(len(tl))]
        ax.plot(range(1, len(tl) + 1), smooth, color=color, alpha=0.6, label=f"{r['optimizer']} train")
        xs, ys = zip(*r["eval_curve"])
        ax.plot(xs, ys, "o-", color=color, label=f"{r['optimizer']} held-out")
        # The curves overlap at this scale: the gap panel shows what the check measures.
        gap.plot(xs, [100 * (y / ref[x] - 1) for x, y in zip(xs, ys)], "o-", color=color)
    gap.axhspan(-1, 1, color="0.9", zorder=0)
    gap.set_ylabel("held-out vs\n32-bit (%)")
    gap.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, help="training steps (default 1000; 30 with --ci)")
    ap.add_argument("--ci", action="store_true", help="tiny model and few steps (seconds)")
    ap.add_argument("--eightbit", choices=["bnbfuse8", "bitsandbytes8"], default="bnbfuse8",
                    help="8-bit optimizer to compare with 32-bit torch AdamW")
    ap.add_argument("--also", choices=["bitsandbytes8"], action="append", default=[],
                    help="extra optimizer(s) to train beside them")
    ap.add_argument("--tol", type=float, default=0.01, help="max relative held-out loss gap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--from-json", metavar="JSON", help="redraw the plot of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        png = Path(args.from_json).with_suffix(".png")
        runs = data["runs"]
        plot(runs, png, f"byte-level LM ({runs[0]['params'] / 1e6:.2f}M params) on stdlib source: "
                        f"32-bit vs 8-bit AdamW")
        print(f"wrote {png}")
        return 0
    cfg = dict(CI if args.ci else FULL)
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        cfg["steps"] = args.steps
        cfg["warmup"] = min(cfg["warmup"], max(1, args.steps // 10))
    if args.threads:
        torch.set_num_threads(args.threads)

    train_bytes, held_bytes = load_bytes(cfg)
    B, T = cfg["batch_size"], cfg["seq_len"]
    train_b = batches(train_bytes, cfg["steps"], B, T, args.seed + 1)
    eval_b = batches(held_bytes, cfg["eval_batches"], B, T, args.seed + 2)
    print(f"byte-level LM on {train_bytes.numel() / 1e6:.1f} MB of stdlib source "
          f"(held-out: {held_bytes.numel() / 1e6:.2f} MB of other files); {cfg}", flush=True)

    runs, failed = [], {}
    for i, kind in enumerate(["adamw32", args.eightbit] +
                             [k for k in args.also if k != args.eightbit]):
        t0 = time.perf_counter()
        try:
            runs.append(train(kind, cfg, train_b, eval_b, args.seed, show=not args.no_progress))
        except Exception as err:  # noqa: BLE001
            if i < 2:  # the reference and the optimizer under test must run
                raise
            # an extra contender (bitsandbytes) that cannot run is reported, not fatal
            failed[kind] = f"{type(err).__name__}: {err}"[:300]
            print(f"  {kind}: failed ({failed[kind]}); skipped", file=sys.stderr, flush=True)
            continue
        print(f"  {kind}: held-out loss {runs[-1]['final_eval_loss']:.4f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)

    ref, q = runs[0], runs[1]
    rel = q["final_eval_loss"] / ref["final_eval_loss"] - 1
    ok = abs(rel) <= args.tol
    rows = [[r["optimizer"], f"{r['params'] / 1e6:.2f}", f"{r['optimizer_state_bytes'] / r['params']:.2f}",
             f"{statistics.fmean(r['train_loss'][-max(1, cfg['steps'] // 10):]):.4f}",
             f"{r['final_eval_loss']:.4f}", f"{100 * (r['final_eval_loss'] / ref['final_eval_loss'] - 1):+.2f}%",
             f"{1000 * r['step_time_s']:.1f}"] for r in runs]
    print()
    print(_common.format_table(["optimizer", "params (M)", "state B/param", "train loss (last 10%)",
                                "held-out loss", "vs 32-bit", "step ms"], rows))
    print(f"\nheld-out loss: 32-bit {ref['final_eval_loss']:.4f}, 8-bit {q['final_eval_loss']:.4f} "
          f"({100 * rel:+.2f}%) -> parity within {100 * args.tol:.0f}%: {'PASS' if ok else 'FAIL'}")

    out = Path(args.out)
    name = "train_parity_ci" if args.ci else "train_parity"
    cmd = "python benchmarks/train_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    jpath = _common.write_json(out / f"{name}.json", dict(
        benchmark="train_parity", config=cfg, seed=args.seed, command=cmd.strip(),
        machine=_common.machine_info(), runs=runs, failed=failed, relative_gap=rel, tol=args.tol,
        passed=ok))
    png = out / f"{name}.png"
    wrote = plot(runs, png, f"byte-level LM ({ref['params'] / 1e6:.2f}M params) on stdlib source: "
                            f"32-bit vs 8-bit AdamW")
    print(f"wrote {jpath}" + (f" and {png}" if wrote else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
