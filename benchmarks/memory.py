"""Training-memory benchmark: fine-tune a Llama-style decoder that gains new tokens.

A ``transformers.LlamaForCausalLM`` is built from a ``LlamaConfig`` (random weights, nothing
downloaded) as the "pretrained" model with ``vocab`` tokens; the fine-tune adds ``new_tokens``
tokens (the most frequent words of the training text, as a user adds domain tokens) and
trains on Python standard-library sources. Each configuration runs in its own process so its
peak memory is its own:

1. ``baseline``       fp32 params, ``torch.optim.AdamW``, embedding and LM head resized, all trained
2. ``bnbfuse-8bit``   ``bnbfuse.optim.AdamW8bit``, embeddings kept 32-bit (``keep_32bit_embeddings``)
3. ``fusion-int8``    (2) + ``bnbfuse.nn.FusionEmbedding``: frozen int8 base, trainable new tokens
4. ``fusion-nf4``     the same with an NF4 base
5. ``bitsandbytes-8bit``  ``bitsandbytes.optim.AdamW8bit`` (embedding 32-bit), when installed

``--configs baseline-fused,...`` adds the baseline with ``torch.optim.AdamW(fused=True)``
(same memory, torch's fastest step) for a step-time comparison.

Per configuration: weight, gradient and optimizer-state bytes (counted from the tensors), peak
process memory (measured: ``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on GPU),
median step time, training loss over the last steps and held-out loss after the run.

The headline figure is "optimizer + embedding" memory: every optimizer-state byte plus the
token-embedding table's weights and gradients — the memory that 8-bit state and a quantized
base vocabulary remove. The model is randomly initialised (nothing is downloaded), so the
losses are a parity check between configurations, not a quality measure.

Usage::

    python benchmarks/memory.py                     # small preset (~61M params, 32k vocab), 1-3 min
    python benchmarks/memory.py --preset 107m       # ~107M params, ~10 min on 2 CPU cores
    python benchmarks/memory.py --preset tiny       # seconds; what CI runs
    python benchmarks/memory.py --preset 1b --device cuda

Writes ``<out>/memory_<preset>.json`` and ``<out>/memory_<preset>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.ensure_bnbfuse_importable()

PRESETS = {
    # CI-sized: runs in seconds per configuration.
    "tiny": dict(vocab=1000, new_tokens=32, hidden=64, intermediate=176, layers=2, heads=4,
                 kv_heads=2, seq_len=32, batch_size=2, steps=4, eval_batches=1, lr=1e-3),
    # ~61M parameters, 32k vocabulary: the default, 1 to 3 minutes for the five
    # configurations on a 2-core CPU.
    "small": dict(vocab=32000, new_tokens=512, hidden=576, intermediate=1536, layers=6,
                  heads=9, kv_heads=9, seq_len=64, batch_size=4, steps=8, eval_batches=2,
                  lr=3e-4),
    # ~107M parameters, 32k vocabulary (a small Llama); about 10 minutes on a 2-core CPU.
    "107m": dict(vocab=32000, new_tokens=512, hidden=768, intermediate=2048, layers=8,
                    heads=12, kv_heads=12, seq_len=64, batch_size=4, steps=8, eval_batches=2,
                    lr=3e-4),
    # TinyLlama-1.1B shape; meant for a GPU.
    "1b": dict(vocab=32000, new_tokens=1024, hidden=2048, intermediate=5632, layers=22,
               heads=32, kv_heads=4, seq_len=512, batch_size=8, steps=30, eval_batches=4,
               lr=2e-4),
}

# Wall time of the five default configurations on a 2-core CPU, printed before a run starts.
EXPECTED_TIME = {"tiny": "under a minute", "small": "1 to 3 minutes", "107m": "about 10 minutes",
                 "1b": "minutes on a GPU (hours on a CPU)"}

CONFIGS = {
    "baseline": "fp32 torch.optim.AdamW, embedding resized, all trained",
    "bnbfuse-8bit": "bnbfuse AdamW8bit, embeddings 32-bit state",
    "fusion-int8": "bnbfuse AdamW8bit + FusionEmbedding(int8 frozen base)",
    "fusion-nf4": "bnbfuse AdamW8bit + FusionEmbedding(NF4 frozen base)",
    "bitsandbytes-8bit": "bitsandbytes AdamW8bit, embeddings 32-bit state",
    # Not run by default: the baseline's memory with torch's fused kernel (same state bytes,
    # faster step), for a step-time comparison against the fastest torch implementation.
    "baseline-fused": "fp32 torch.optim.AdamW(fused=True), embedding resized, all trained",
}
DEFAULT_CONFIGS = ["baseline", "bnbfuse-8bit", "fusion-int8", "fusion-nf4", "bitsandbytes-8bit"]

_TOKEN_RE = re.compile(rb"\w+|[^\w\s]|\n[ \t]*")
_WORD_RE = re.compile(rb"\w\w+")


# ----------------------------------------------------------------------------- data
def make_tokens(vocab: int, new_tokens: int, n_train: int, n_eval: int):
    """Word-level tokens of stdlib sources. The ``new_tokens`` most frequent words of the
    training text get the new ids ``vocab .. vocab + new_tokens - 1``; every other token is
    hashed (crc32) into the base vocabulary. Held-out tokens come from later files."""
    import torch

    def tokenize(n_tokens, skip):
        # ~5 bytes per token in Python source; read more and cut.
        text = _common.stdlib_text(n_tokens * 8 + 4096, skip_bytes=skip)
        return _TOKEN_RE.findall(text)[:n_tokens], len(text)

    train_words, used = tokenize(n_train, 0)
    eval_words, _ = tokenize(n_eval, used + 1_000_000)
    if len(train_words) < n_train or len(eval_words) < n_eval:
        raise RuntimeError("not enough stdlib text for the requested tokens")
    counts = Counter(w for w in train_words if _WORD_RE.fullmatch(w))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:new_tokens]
    new_ids = {w: vocab + i for i, (w, _) in enumerate(ranked)}

    def ids(words):
        return torch.tensor([new_ids.get(w, zlib.crc32(w) % vocab) for w in words], dtype=torch.long)

    return ids(train_words), ids(eval_words)


# ----------------------------------------------------------------------------- model
def build_model(p: dict, config: str, seed: int, device):
    """The 'pretrained' model (vocab p['vocab']) with p['new_tokens'] tokens added the way
    ``config`` adds them. Returns (model, token-embedding module)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"],
                      intermediate_size=p["intermediate"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      max_position_embeddings=max(2048, p["seq_len"]), tie_word_embeddings=False,
                      use_cache=False)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    V, N, d = p["vocab"], p["new_tokens"], p["hidden"]

    # New rows drawn from their own generator so every configuration starts from the same
    # weights for the same token, whichever way the table is stored.
    g = torch.Generator().manual_seed(seed + 1)
    std = cfg.initializer_range
    new_in = (torch.randn(N, d, generator=g) * std).to(device)
    new_out = (torch.randn(N, d, generator=g) * std).to(device)

    old_head = model.get_output_embeddings()
    head = torch.nn.Linear(d, V + N, bias=False, device=device)
    with torch.no_grad():
        head.weight[:V].copy_(old_head.weight)
        head.weight[V:].copy_(new_out)
    model.set_output_embeddings(head)
    del old_head

    if config.startswith("fusion-"):
        from bnbfuse.nn import add_fusion_tokens
        # One call: the pretrained table becomes the frozen quantized base.
        emb = add_fusion_tokens(model, N, base_quant=config.split("-", 1)[1])
        with torch.no_grad():
            emb.fusion_embedding.weight.copy_(new_in)
    else:
        old_emb = model.get_input_embeddings()
        emb = torch.nn.Embedding(V + N, d, device=device)
        with torch.no_grad():
            emb.weight[:V].copy_(old_emb.weight)
            emb.weight[V:].copy_(new_in)
        model.set_input_embeddings(emb)
        del old_emb
    model.config.vocab_size = V + N
    return model, emb


def build_optimizer(model, emb, config: str, lr: float):
    import torch
    params = [q for q in model.parameters() if q.requires_grad]
    kw = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    if config == "baseline":
        return torch.optim.AdamW(params, **kw)
    if config == "baseline-fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if config == "bitsandbytes-8bit":
        import bitsandbytes as bnb
        mng = bnb.optim.GlobalOptimManager.get_instance()
        mng.register_parameters(params)
        mng.override_config(emb.weight, "optim_bits", 32)
        return bnb.optim.AdamW8bit(params, **kw)
    import bnbfuse
    bnbfuse.optim.keep_32bit_embeddings(model)
    return bnbfuse.optim.AdamW8bit(params, **kw)


# ----------------------------------------------------------------------------- worker
def run_config(config: str, p: dict, device: str, seed: int, tokens, show_progress: bool = True) -> dict:
    """Trains one configuration in this process and returns its measurements.
    ``tokens`` is ``make_tokens``' (train, eval) pair."""
    import torch
    import torch.nn.functional as F

    # Every configuration's process imports the same libraries, so that the peaks compare
    # the training and not which libraries a configuration happened to load.
    import bnbfuse  # noqa: F401
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed or not usable: its configuration is skipped anyway
        pass
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_start = _common.current_rss_bytes()
    B, T, steps = p["batch_size"], p["seq_len"], p["steps"]
    train_ids, eval_ids = tokens
    model, emb = build_model(p, config, seed, device)
    opt = build_optimizer(model, emb, config, p["lr"])
    vocab_total = p["vocab"] + p["new_tokens"]
    rss_model = _common.current_rss_bytes()

    def loss_of(ids):
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab_total).float(), ids[:, 1:].reshape(-1))

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    losses, times = [], []
    grad_bytes = emb_grad_bytes = 0
    model.train()
    for step in _common.progress(range(steps), total=steps, desc=config, disable=not show_progress):
        ids = train_ids[step * B * T:(step + 1) * B * T].view(B, T).to(device)
        sync()
        t0 = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        if step == steps - 1:  # gradients as they stand when the optimizer reads them
            grad_bytes = _common.tensor_bytes([q.grad for q in model.parameters() if q.grad is not None])
            emb_grad_bytes = _common.tensor_bytes([q.grad for q in emb.parameters() if q.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{config}: loss became {losses[-1]} at step {step}")

    model.eval()
    with torch.no_grad():
        ev = eval_ids.view(p["eval_batches"], B, T).to(device)
        eval_loss = statistics.fmean(float(loss_of(ev[i])) for i in range(p["eval_batches"]))

    emb_param_ids = {id(q) for q in emb.parameters()}
    state = {id(q): s for q, s in opt.state.items()}
    weight_bytes = _common.tensor_bytes(list(model.parameters()) + list(model.buffers()))
    emb_weight_bytes = _common.tensor_bytes(list(emb.parameters()) + list(emb.buffers()))
    opt_bytes = _common.tensor_bytes(list(state.values()))
    emb_opt_bytes = _common.tensor_bytes([s for k, s in state.items() if k in emb_param_ids])
    state8 = sum(q.numel() for q, s in opt.state.items()
                 if isinstance(s.get("state1"), torch.Tensor) and s["state1"].dtype == torch.uint8)
    n_params = sum(q.numel() for q in model.parameters())
    n_trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    tail = max(1, steps // 4)
    result = dict(
        config=config, description=CONFIGS[config], device=device,
        params=n_params, trainable_params=n_trainable, params_with_8bit_state=state8,
        weight_bytes=weight_bytes, grad_bytes=grad_bytes, optimizer_state_bytes=opt_bytes,
        embedding_weight_bytes=emb_weight_bytes, embedding_grad_bytes=emb_grad_bytes,
        embedding_optimizer_state_bytes=emb_opt_bytes,
        optimizer_plus_embedding_bytes=opt_bytes + emb_weight_bytes + emb_grad_bytes,
        rss_start_bytes=rss_start, rss_after_build_bytes=rss_model,
        step_time_s=statistics.median(times[1:] if len(times) > 1 else times),
        first_step_time_s=times[0], train_loss=statistics.fmean(losses[-tail:]),
        first_loss=losses[0], eval_loss=eval_loss, losses=losses,
    )
    if device.startswith("cuda"):
        result["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        result["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_bytes"] = _common.peak_rss_bytes()
        result["peak_kind"] = "peak RSS (ru_maxrss)"
    return result


def _worker_main(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    p = json.loads(args.params)
    tokens = torch.load(args.tokens)
    res = run_config(args.worker, p, args.device, args.seed, tokens, show_progress=not args.no_progress)
    Path(args.result_file).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------- driver
def available_configs() -> dict[str, str]:
    """Configurations that can run here, and why the others cannot."""
    out = {}
    try:
        import bnbfuse.optim as bo
        import bnbfuse.nn as bn
        if not hasattr(bo, "AdamW8bit"):
            raise ImportError("bnbfuse.optim.AdamW8bit is missing")
        out["bnbfuse-8bit"] = ""
        out["fusion-int8"] = out["fusion-nf4"] = "" if hasattr(bn, "FusionEmbedding") else \
            "bnbfuse.nn.FusionEmbedding is missing"
    except ImportError as e:
        out["bnbfuse-8bit"] = out["fusion-int8"] = out["fusion-nf4"] = str(e)
    try:
        import bitsandbytes  # noqa: F401
        out["bitsandbytes-8bit"] = ""
    except Exception as e:  # bitsandbytes can fail on import for reasons other than absence
        out["bitsandbytes-8bit"] = f"bitsandbytes not usable: {e}"
    out["baseline"] = out["baseline-fused"] = ""
    return out


def summarize(results: list[dict]) -> dict:
    """Savings against the baseline of the same run (fp32 AdamW, else the fused one); empty
    without either, and the table then shows no "vs base"."""
    by = {r["config"]: r for r in results}
    base = by.get("baseline") or by.get("baseline-fused")
    summary = {}
    if not base:
        return summary
    for r in results:
        summary[r["config"]] = dict(
            optimizer_plus_embedding_saving=1 - r["optimizer_plus_embedding_bytes"] / base["optimizer_plus_embedding_bytes"],
            weights_grads_state_saving=1 - (r["weight_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"])
            / (base["weight_bytes"] + base["grad_bytes"] + base["optimizer_state_bytes"]),
            peak_saving=1 - r["peak_bytes"] / base["peak_bytes"],
            eval_loss_rel_diff=r["eval_loss"] / base["eval_loss"] - 1,
        )
    return summary


def print_report(results: list[dict], summary: dict, missing: dict) -> None:
    headers = ["config", "trainable (M)", "weights MiB", "grads MiB", "opt state MiB", "opt+emb MiB",
               "opt+emb vs base", "peak MiB", "step time s", "train loss", "eval loss"]
    rows = []
    for r in results:
        s = summary.get(r["config"], {})
        rows.append([r["config"], f"{r['trainable_params'] / 1e6:.1f}", _common.mib(r["weight_bytes"]),
                     _common.mib(r["grad_bytes"]), _common.mib(r["optimizer_state_bytes"]),
                     _common.mib(r["optimizer_plus_embedding_bytes"]),
                     (f"{-100 * s['optimizer_plus_embedding_saving']:+.0f}%" if s else "–"),
                     _common.mib(r["peak_bytes"]), f"{r['step_time_s']:.3f}",
                     f"{r['train_loss']:.3f}", f"{r['eval_loss']:.3f}"])
    print()
    print(_common.format_table(headers, rows))
    print(f"\npeak = {results[0]['peak_kind']} of each configuration's own process; "
          "opt+emb = optimizer state + token-embedding weights and gradients; step time is "
          "indicative only (the configurations run one after another; for step speed see "
          "optimizer_step.py)")
    for r in results:
        s = summary.get(r["config"])
        if not s or r["config"].startswith("baseline"):
            continue
        print(f"{r['config']}: optimizer+embedding memory {_less(s['optimizer_plus_embedding_saving'])} "
              f"than the baseline (weights+grads+state {_less(s['weights_grads_state_saving'])}, "
              f"peak {_less(s['peak_saving'])}); eval loss {100 * s['eval_loss_rel_diff']:+.2f}% "
              "vs the baseline")
    for c, why in missing.items():
        print(f"{c}: not run ({why})")


def _title(results: list[dict], p: dict, device: str) -> str:
    return (f"Llama-style {results[0]['params'] / 1e6:.0f}M params, {p['vocab']} + {p['new_tokens']} "
            f"tokens, {device}: training memory by configuration")


def _less(saving: float) -> str:
    return f"{100 * saving:.1f}% less" if saving >= 0 else f"{-100 * saving:.1f}% more"


def plot(results: list[dict], path: Path, title: str, summary: dict | None = None,
         missing: dict | None = None) -> bool:
    """Left: the headline, optimizer + embedding memory per configuration with its saving.
    Right: what makes up the training memory (weights, gradients, optimizer state), with
    totals and the measured peak written on each bar."""
    if not _common.have_matplotlib():
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return False
    plt = _common.pyplot()
    summary = summary or {}
    names = [r["config"] for r in results]
    x = list(range(len(names)))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(2.2 * len(names) + 4, 4.8))
    headline = [r["optimizer_plus_embedding_bytes"] / 2**20 for r in results]
    colors = ["#8c8c8c" if n.startswith("baseline") else "#2a9d8f" for n in names]
    ax0.bar(x, headline, color=colors)
    for i, (name, v) in enumerate(zip(names, headline)):
        s = summary.get(name)
        label = f"{v:.0f} MiB"
        if s and not name.startswith("baseline"):
            label += f"\n{-100 * s['optimizer_plus_embedding_saving']:+.0f}%"
        ax0.text(i, v, label, ha="center", va="bottom", fontsize=8)
    ax0.set_ylim(0, 1.25 * max(headline))
    ax0.set_ylabel("MiB")
    ax0.set_title("optimizer state + embedding weights and grads", fontsize=9)
    parts = [("weights", "weight_bytes", "#4c72b0"), ("gradients", "grad_bytes", "#dd8452"),
             ("optimizer state", "optimizer_state_bytes", "#55a868")]
    bottom = [0.0] * len(names)
    for label, key, color in parts:
        vals = [r[key] / 2**20 for r in results]
        ax1.bar(x, vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, (b, r) in enumerate(zip(bottom, results)):
        ax1.text(i, b, f"{b:.0f} MiB\n(peak {r['peak_bytes'] / 2**20:.0f})", ha="center",
                 va="bottom", fontsize=7)
    ax1.set_ylim(0, 1.3 * max(bottom))
    ax1.set_title(f"weights + gradients + state (peak: {results[0]['peak_kind']})", fontsize=9)
    ax1.legend(fontsize=7, loc="upper right", frameon=False)
    for ax in (ax0, ax1):
        ax.set_xticks(x, names, rotation=20, fontsize=8)
    fig.suptitle(title, fontsize=10)
    if missing:
        fig.text(0.01, 0.01, "not run: " + "; ".join(f"{c} ({why})" for c, why in missing.items()),
                 fontsize=7, color="#a00")
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--from-json", metavar="JSON",
                    help="re-print the table and redraw the plot of an earlier run's JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker_main(args)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        missing = {**data.get("skipped", {}), **{c: "worker failed" for c in data.get("failed", [])}}
        print_report(data["results"], data["summary"], missing)
        png = Path(args.from_json).with_suffix(".png")
        if plot(data["results"], png, _title(data["results"], data["params"], data["device"]),
                data["summary"], missing):
            print(f"\nwrote {png}")
        return 0

    p = dict(PRESETS[args.preset])
    for key, val in (("steps", args.steps), ("batch_size", args.batch_size),
                     ("seq_len", args.seq_len), ("lr", args.lr)):
        if val is not None:
            if key != "lr" and val < 1:
                raise SystemExit(f"--{key.replace('_', '-')} must be >= 1")
            p[key] = val
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch sees no GPU")

    avail = available_configs()
    skipped = {c: avail[c] for c in configs if avail.get(c)}
    for c, why in skipped.items():
        print(f"skipping {c}: {why}", file=sys.stderr)
    configs = [c for c in configs if c not in skipped]

    print(f"memory benchmark, preset {args.preset} ({len(configs)} configurations; expected time "
          f"{EXPECTED_TIME.get(args.preset, 'unknown')} on 2 CPU cores): {p}", flush=True)
    results = []
    import torch
    B, T = p["batch_size"], p["seq_len"]
    tokens = make_tokens(p["vocab"], p["new_tokens"], B * T * p["steps"], B * T * p["eval_batches"])
    new_frac = float((tokens[0] >= p["vocab"]).float().mean())
    print(f"data: {tokens[0].numel()} training tokens of stdlib source, {100 * new_frac:.0f}% of them "
          f"new tokens; {tokens[1].numel()} held-out tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokens.pt"
        torch.save(tokens, tok_file)
        failed = []
        for c in configs:
            rf = Path(tmp) / f"{c}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", c, "--params", json.dumps(p),
                   "--result-file", str(rf), "--tokens", str(tok_file), "--device", args.device, "--seed", str(args.seed),
                   "--threads", str(args.threads)] + (["--no-progress"] if args.no_progress else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not rf.exists():
                # reported, and the configurations that ran are still summarised and saved
                print(f"  {c}: worker failed (exit code {proc.returncode}); skipped",
                      file=sys.stderr, flush=True)
                failed.append(c)
                continue
            res = json.loads(rf.read_text())
            res["wall_s"] = time.perf_counter() - t0
            results.append(res)
            print(f"  {c}: eval loss {res['eval_loss']:.3f}, step {res['step_time_s']:.2f}s, "
                  f"peak {_common.mib(res['peak_bytes'])} MiB ({res['wall_s']:.0f}s)", flush=True)

    if not results:
        return 1
    summary = summarize(results)
    missing = {**skipped, **{c: "worker failed" for c in failed}}
    print_report(results, summary, missing)
    out = Path(args.out)
    data = dict(benchmark="memory", preset=args.preset, params=p, device=args.device,
                new_token_fraction=new_frac,
                command="python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
                machine=_common.machine_info(), skipped=skipped, failed=failed, results=results,
                summary=summary)
    jpath = _common.write_json(out / f"memory_{args.preset}.json", data)
    png = out / f"memory_{args.preset}.png"
    wrote = plot(results, png, _title(results, p, args.device), summary, missing)
    print(f"\nwrote {jpath}" + (f" and {png}" if wrote else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
