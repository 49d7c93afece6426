"""The lookahead models and objectives in PyTorch, written for speed as a PyTorch engineer would:
fused scaled-dot-product attention, pass 1's keys and values reused by the lookahead passes,
fused AdamW, global gradient-norm clipping. It is the reference `cargo xtask bench` compares
`lookahead bench` with, and `tests/pytorch_reference.rs` checks that it computes what the Rust
models compute (docs/models.md, docs/training.md) on the same weights and batch.

    python bench/reference.py check DUMP.json          # compare with the Rust models (see the test)
    python bench/reference.py bench --d-model 128 ...   # ms/step per objective, JSON on stdout
    python bench/reference.py bench --device cuda --precision bf16 ...   # on a GPU, as bench/gpu-check.sh
"""

import argparse
import contextlib
import json
import math
import resource
import sys
import time
import warnings

# The CPU wheels need no NumPy; PyTorch warns on import when it is absent.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LN_EPS = 1e-5


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.output = (nn.Linear(d, d) for _ in range(4))

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, dh]

    def forward(self, x, mask, past=None):
        """`mask`: "causal", None (attend to everything) or a boolean [T, P + T] (True = attend)."""
        b, t, d = x.shape
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        if isinstance(mask, str):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.output(y.transpose(1, 2).reshape(b, t, d)), own


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(d, eps=LN_EPS)
        self.attn, self.mlp = Attention(d, heads), Mlp(d, hidden)

    def forward(self, x, mask):
        x = x + self.attn(self.ln1(x), mask)[0]
        return x + self.mlp(self.ln2(x))


class AdaptiveLayer(nn.Module):
    """LN_noaffine(x) · (1 + scale) + shift, [scale | shift] = Linear(1 → 2d)(c)."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.modulation = nn.Linear(1, 2 * d)

    def forward(self, x, c):
        scale, shift = self.modulation(c).split(self.d, dim=-1)
        return F.layer_norm(x, (self.d,), eps=LN_EPS) * (1 + scale) + shift


class MetaAwareBlock(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.adapt1, self.adapt2 = AdaptiveLayer(d), AdaptiveLayer(d)
        self.attn, self.mlp = Attention(d, heads), Mlp(d, hidden)

    def forward(self, x, c, mask, past=None):
        attended, kv = self.attn(self.adapt1(x, c), mask, past)
        x = x + attended
        return x + self.mlp(self.adapt2(x, c)), kv


class MiniGPT(nn.Module):
    def __init__(self, vocab, context, d, layers, heads, hidden):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(context + 1, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x, "causal")
        return self.ln_f(x) @ self.tok_emb.weight.T  # tied head, [B, T, V]


class ConfidenceGPT(nn.Module):
    def __init__(self, vocab, context, d, layers, heads, hidden, probe_blocks=0, init_bias=2.0):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(context + 1, d)
        self.blocks = nn.ModuleList(MetaAwareBlock(d, heads, hidden) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=LN_EPS)
        self.probe_blocks = probe_blocks
        self.confidence_predictor = nn.Linear(d * max(1, probe_blocks), 1)
        nn.init.constant_(self.confidence_predictor.bias, init_bias)

    def forward(self, ids, conf, positions=None, mask="causal", past=None):
        """Logits [B, T, V], predicted future loss [B, T], and each layer's keys/values."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(positions)
        c = conf.unsqueeze(-1)
        first_probed = len(self.blocks) - self.probe_blocks
        probed, cache = [], []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, c, mask, None if past is None else past[i])
            cache.append(kv)
            if i >= first_probed:
                probed.append(x)
        h = self.ln_f(x)
        head_in = torch.cat(probed, -1).detach() if probed else h
        confidence = self.confidence_predictor(head_in).squeeze(-1)
        return h @ self.tok_emb.weight.T, confidence, cache


def init_weights(model, init_bias=2.0):
    """DESIGN §4: N(0, 0.02) weights, zero biases, zero modulation, the confidence bias."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, AdaptiveLayer):
            nn.init.zeros_(module.modulation.weight)
    if isinstance(model, ConfidenceGPT):
        nn.init.constant_(model.confidence_predictor.bias, init_bias)
    return model


# ---- objectives (docs/training.md) ----


def token_ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def sample(logits, uniforms):
    """Inverse CDF at the given uniforms, one draw per (row, position)."""
    cdf = logits.softmax(-1).cumsum(-1)
    return (cdf < uniforms.unsqueeze(-1)).sum(-1).clamp_max(logits.shape[-1] - 1)


def history(model, x, self_conditioned):
    zeros = torch.zeros(x.shape, device=x.device)
    if not self_conditioned:
        return zeros
    with torch.no_grad():
        predictions = model(x, zeros)[1]
    return torch.cat([zeros[:, :1], predictions[:, :-1]], 1)


def dense_extension_mask(seq, device):
    """[L, 2L], True = attend: sample k sees prefix 0..k and itself."""
    i = torch.arange(seq, device=device)
    prefix = i.view(-1, 1) >= i.view(1, -1)
    own = torch.eye(seq, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], 1)


def standard_step(model, tokens, uniforms, alpha, self_conditioned):
    seq = tokens.shape[1] - 2
    loss = token_ce(model(tokens[:, :seq]), tokens[:, 1 : seq + 1]).mean()
    return {"total": loss, "lm_loss": loss}


def dense_step(model, tokens, uniforms, alpha, self_conditioned, mask_cache={}):
    seq = tokens.shape[1] - 2
    x, y1, y2 = tokens[:, :seq], tokens[:, 1 : seq + 1], tokens[:, 2:]
    logits, conf, cache = model(x, history(model, x, self_conditioned))
    lm = token_ce(logits, y1).mean()
    with torch.no_grad():
        key = (seq, str(tokens.device))
        if key not in mask_cache:
            mask_cache[key] = dense_extension_mask(seq, tokens.device)
        past = [(k.detach(), v.detach()) for k, v in cache]
        positions = torch.arange(1, seq + 1, device=tokens.device)
        samples = sample(logits, uniforms)
        future_logits = model(samples, conf.detach(), positions, mask_cache[key], past)[0]
        future = token_ce(future_logits, y2)
    conf_loss = F.mse_loss(conf, future)
    return {"total": lm + alpha * conf_loss, "lm_loss": lm, "conf_loss": conf_loss}


def seed_step(model, tokens, uniforms, alpha, self_conditioned):
    seq = tokens.shape[1] - 2
    x, y1, y2 = tokens[:, :seq], tokens[:, 1 : seq + 1], tokens[:, 2:]
    logits, conf, cache = model(x, history(model, x, self_conditioned))
    last = logits[:, -1:]
    lm = token_ce(last, y1[:, -1:]).mean()
    conf_last = conf[:, -1:]
    with torch.no_grad():
        past = [(k.detach(), v.detach()) for k, v in cache]
        s = sample(last, uniforms[:, -1:])
        positions = torch.tensor([seq], device=tokens.device)
        future_logits = model(s, conf_last.detach(), positions, None, past)[0]
        future = token_ce(future_logits, y2[:, -1:])
    conf_loss = F.mse_loss(conf_last, future)
    return {"total": lm + alpha * conf_loss, "lm_loss": lm, "conf_loss": conf_loss}


def teacher_step(model, tokens, uniforms, alpha, self_conditioned):
    seq = tokens.shape[1] - 2
    x, targets = tokens[:, : seq + 1], tokens[:, 1:]
    logits, conf, _ = model(x, history(model, x, self_conditioned))
    with torch.no_grad():
        future = token_ce(logits, targets)[:, 1:]
    lm = token_ce(logits[:, :seq], targets[:, :seq]).mean()
    conf_loss = F.mse_loss(conf[:, :seq], future)
    return {"total": lm + alpha * conf_loss, "lm_loss": lm, "conf_loss": conf_loss}


STEPS = {"standard": standard_step, "seed": seed_step, "dense": dense_step, "teacher": teacher_step}


def adamw(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def train_step(model, optimizer, objective, tokens, uniforms, alpha=1.0, self_conditioned=True, autocast=contextlib.nullcontext):
    """One optimizer step; the forward passes under `autocast()` (mixed precision), the backward not."""
    with autocast():
        out = STEPS[objective](model, tokens, uniforms, alpha, self_conditioned)
    out["total"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


# ---- the check against the Rust models ----


def load_export(path):
    """The model of a `lookahead export` file: built from its metadata, weights loaded strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    architecture = json.loads(meta["lookahead.architecture"])
    if architecture["model"] == "standard":
        g = architecture["config"]
        model = MiniGPT(g["vocab_size"], g["context_length"], g["d_model"], g["n_layers"], g["n_heads"], g["mlp_hidden"])
    else:
        c = architecture["config"]
        g = c["gpt"]
        probe = min(3, g["n_layers"]) if c["conf_head"] == "probe" else 0
        model = ConfidenceGPT(g["vocab_size"], g["context_length"], g["d_model"], g["n_layers"], g["n_heads"], g["mlp_hidden"], probe)
    model.load_state_dict(load_file(path), strict=True)
    return model


def check(path):
    """Losses of every objective and the logits of each model, against the Rust models' values."""
    dump = json.load(open(path))
    tokens = torch.tensor(dump["tokens"])
    uniforms = torch.tensor(dump["uniforms"], dtype=torch.float32)
    seq = tokens.shape[1] - 2
    models = {"standard": load_export(dump["standard_export"]), "confidence": load_export(dump["export"])}
    failures = []
    for name, model in models.items():
        x = tokens[:, :seq]
        with torch.no_grad():
            logits = model(x) if name == "standard" else model(x, torch.zeros(x.shape))[0]
        want = torch.tensor(dump["logits"][name], dtype=torch.float32).view(logits.shape)
        gap = (logits - want).abs().max().item()
        ok = gap <= 1e-4
        print(f"{name:<10} logits     max |rust - torch| {gap:.2e} {'ok' if ok else 'DIFFERS'}")
        if not ok:
            failures.append(f"{name} logits")
    for objective, expected in dump["expected"].items():
        model = models["standard" if objective == "standard" else "confidence"]
        got = STEPS[objective](model, tokens, uniforms, dump["alpha"], True)
        for name, want in expected.items():
            value = got[name].item()
            ok = abs(value - want) <= 1e-4 * abs(want) + 1e-5
            print(f"{objective:<10} {name:<10} rust {want:.7f} torch {value:.7f} {'ok' if ok else 'DIFFERS'}")
            if not ok:
                failures.append(f"{objective} {name}")
    if failures:
        raise SystemExit(f"differs from the Rust models: {', '.join(failures)}")


# ---- the benchmark ----


def matched_hidden(vocab, context, d, layers, probe_blocks):
    """The MiniGPT MLP width whose parameter count is closest to the confidence model's."""
    shared = lambda h: vocab * d + (context + 1) * d + layers * (4 * (d * d + d) + 2 * d * h + h + d) + 2 * d
    target = shared(4 * d) + layers * 8 * d + d * max(1, probe_blocks) + 1
    base, per = shared(0) + layers * 4 * d, layers * (2 * d + 1)
    estimate = max(1, (target - base) // per)
    return min((h for h in (estimate, estimate + 1)), key=lambda h: (abs(base + h * per - target), h))


def bench(a):
    torch.set_num_threads(a.threads)
    # f32 on the CPU runs no oneDNN kernel, but with oneDNN on every small product (those inside
    # SDPA's CPU kernel too) first looks up whether to run it in bf16; tch-cpu switches it off too.
    torch.backends.mkldnn.enabled = False
    device = torch.device(a.device)
    # As `lookahead --precision`: f32 strict, tf32 products on CUDA, bf16 products under autocast
    # with f32 weights, optimizer state, softmax statistics and losses.
    if a.precision == "tf32":
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # PyTorch ≥ 2.9
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if a.precision == "bf16" else contextlib.nullcontext
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    runs = []
    for objective in a.objectives.split(","):
        hidden = 4 * a.d_model
        if objective == "standard":
            hidden = matched_hidden(a.vocab, a.seq_len, a.d_model, a.n_layers, 0)
            model = MiniGPT(a.vocab, a.seq_len, a.d_model, a.n_layers, a.n_heads, hidden)
        else:
            model = ConfidenceGPT(a.vocab, a.seq_len, a.d_model, a.n_layers, a.n_heads, hidden)
        init_weights(model).to(device)
        if a.compile:  # forward and backward through TorchInductor: fused element-wise kernels
            model.compile()
        batches = [
            (
                torch.randint(0, a.vocab, (a.batch_size, a.seq_len + 2), generator=gen).to(device),
                torch.rand(a.batch_size, a.seq_len, generator=gen).to(device),
            )
            for _ in range(a.warmup_steps + a.steps)
        ]
        runs.append({"objective": objective, "model": model, "optimizer": adamw(model, 1e-3, 0.1), "batches": iter(batches), "seconds": 0.0})

    def run_steps(run, steps):
        for _ in range(steps):
            tokens, uniforms = next(run["batches"])
            run["out"] = train_step(run["model"], run["optimizer"], run["objective"], tokens, uniforms, autocast=autocast)
            if device.type == "cuda":  # as `lookahead bench`, which waits for each step
                torch.cuda.synchronize()

    # As `lookahead bench`: after the warm-up, the objectives take turns of --turn-steps timed
    # steps, so that a busy spell of the host slows them alike.
    for run in runs:
        run_steps(run, a.warmup_steps)
    turn = max(1, a.turn_steps)
    for done in range(0, a.steps, turn):
        for run in runs:
            started = time.perf_counter()
            run_steps(run, min(turn, a.steps - done))
            run["seconds"] += time.perf_counter() - started
    rows = [
        {
            "objective": run["objective"],
            "parameters": sum(p.numel() for p in run["model"].parameters()),
            "ms_per_step": 1e3 * run["seconds"] / a.steps,
            "tokens_per_second": a.steps * a.batch_size * a.seq_len / run["seconds"],
            "last_lm_loss": run["out"]["lm_loss"].item(),
        }
        for run in runs
    ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB on Linux
    report = {"torch": torch.__version__, "device": a.device, "precision": a.precision, "compile": a.compile, "threads": a.threads, "rows": rows, "peak_host_mib": peak}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    json.dump(report, sys.stdout)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="compare with the Rust models: their exports, a batch and the values they computed")
    c.add_argument("dump")
    b = sub.add_parser("bench", help="time each objective's training step")
    for name, default in [("d-model", 128), ("n-layers", 4), ("n-heads", 4), ("seq-len", 128), ("batch-size", 16), ("vocab", 32), ("threads", 2), ("steps", 10), ("warmup-steps", 3), ("turn-steps", 5), ("seed", 42)]:
        b.add_argument(f"--{name}", type=int, default=default)
    b.add_argument("--objectives", default="standard,seed,dense,teacher")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    b.add_argument("--precision", choices=["f32", "tf32", "bf16"], default="f32")
    b.add_argument("--compile", action="store_true", help="torch.compile each model (its forward and backward; the warm-up steps compile)")
    a = parser.parse_args()
    if a.command == "check":
        check(a.dump)
    else:
        bench(a)


if __name__ == "__main__":
    main()
