"""Diagnostics: does each method do what it exists for? (STYLE 14: a method is checked against its purpose, not only
against its definition.)

    python -m vapt_min.bench probe RUN_DIR [RUN_DIR ...]    # every diagnostic of trained runs, on their test split

- **Instance reliance, the swap test.** The generator is fed, before every block, the tokens and prompt outputs of
  *another* image of the batch (a derangement: image b reads image b+1's), then a *null* input (the batch mean: the
  same for every image). Three accuracies (own, swapped, null input) and the share of predictions the swap changes.
  A generator that ignores the image changes nothing. One that relies on it changes predictions, and one whose
  image-dependent part carries something useful loses accuracy when fed another image's.
  The batches must mix classes (the loader is shuffled with a fixed seed), else a swap mostly trades like for like.
- **Latent information.** The KL of V²APT's posterior to its prior per image, in nats and in bits (nats / ln 2):
  the *rate*, an upper bound on what z says about the image. Under one bit (ln 2 nats) the latent cannot even say
  which half of the data an image belongs to: collapsed. The bound can be loose: a small σ alone makes the KL large
  while every image gets the same μ. So we also estimate the mutual information I(x; z) itself, with the aggregate
  posterior of the split as the marginal: I ≈ mean_i log q_i(z_i) − log mean_j q_j(z_i), z_i ~ q_i
  (at most log of the number of images). That is the figure the collapse warning reads.
- **Scale.** Per block, the mean norm of a prompt token the generator inserts, and of its parts where the generator
  names them (`PromptGenerator.parts`: V²APT's base and image-dependent part, ViaPT's mean, kept history and learnt
  part, ...), beside VPT-Deep's for reference.
- **Loss balance.** Per epoch, each auxiliary term raw and weighted next to the cross-entropy (metrics.jsonl).

Shapes: B batch, N patches, P prompts, D width, L layers.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader

BIT = math.log(2)  # one bit in nats: the collapse line of a latent


@contextmanager
def fed(generator, transform):
    """Inside the block, `generator` sees transform(tokens) and transform(prompts) in place of its image's own."""
    original = generator.forward

    def forward(i, tokens, prompts, aux):
        return original(i, transform(tokens), None if prompts is None else transform(prompts), aux)
    generator.forward = forward                       # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del generator.forward


def derangement(x):
    """Image b gets image b+1's tensor (the last gets the first's): no image keeps its own."""
    return x.roll(-1, dims=0)


def batch_mean(x):
    """The same input for every image: the batch mean carries no instance information."""
    return x.mean(0, keepdim=True).expand_as(x)


def mixed_loader(samples, batch_size: int = 64, seed: int = 0) -> DataLoader:
    """Batches that mix classes (a fixed shuffle), so that a swap within the batch swaps different images."""
    return DataLoader(samples, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def swap_test(model, loader, device, bf16: bool = False) -> dict:
    """Accuracy with each image's own generator input, another image's and the null one; the share of predictions
    that change under the swap and under the null input. A batch of one image has no other: it is skipped."""
    model.eval()
    hits, changed, n = {"own": 0, "swapped": 0, "null": 0}, {"swapped": 0, "null": 0}, 0
    for x, y in loader:
        if len(y) < 2:
            continue
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            own = model(x)[0].argmax(-1)
            preds = {"own": own}
            for name, transform in (("swapped", derangement), ("null", batch_mean)):
                with fed(model.generator, transform):
                    preds[name] = model(x)[0].argmax(-1)
        for name, pred in preds.items():
            hits[name] += int((pred == y).sum())
            if name != "own":
                changed[name] += int((pred != own).sum())
        n += len(y)
    n = max(n, 1)
    return {"acc_own": hits["own"] / n, "acc_swapped": hits["swapped"] / n, "acc_null": hits["null"] / n,
            "changed_swapped": changed["swapped"] / n, "changed_null": changed["null"] / n, "images": n}


def gaussian_log_density(z, mu, logvar):
    """log N(z; μ, diag σ²) for every pair: z (M, K), μ and log σ² (N, K) → (M, N)."""
    d = (z[:, None] - mu[None]).pow(2) / logvar.exp()[None]
    return -0.5 * (d + logvar[None] + math.log(2 * math.pi)).sum(-1)


def mutual_information(mu, logvar, samples: int = 8, seed: int = 0, chunk: int = 512) -> float:
    """I(x; z) in nats for diagonal Gaussian posteriors q_i = N(μ_i, σ_i²), one per image, with the aggregate
    posterior (1/N) Σ_j q_j as the marginal: mean over i and draws z ~ q_i of log q_i(z) − log (1/N) Σ_j q_j(z).
    0 when every image has the same posterior; at most log N when they do not overlap. The N × N densities are taken
    `chunk` draws at a time: all at once they need N² · K doubles, 6.4 GB for a 10,000-image test set."""
    mu, logvar = mu.double(), logvar.double()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        z = mu + torch.randn(mu.shape, generator=g, dtype=mu.dtype) * (0.5 * logvar).exp()     # z_i ~ q_i
        for a in range(0, len(mu), chunk):
            logq = gaussian_log_density(z[a:a + chunk], mu, logvar)                          # (chunk, N)
            own = logq.diagonal(offset=a)                                                    # log q_i(z_i)
            total += float((own - (logq.logsumexp(1) - math.log(len(mu)))).sum())
    return total / (samples * len(mu))


@torch.no_grad()
def latent_information(model, loader, device) -> dict | None:
    """The mean KL per image of the generator's posterior (the rate, nats and bits), the mutual information I(x; z)
    over the split (nats and bits), and whether the latent has collapsed (I under one bit); None without a KL term."""
    model.eval()
    total, n, mus, logvars = 0.0, 0, [], []
    for x, _ in loader:
        _, aux = model(x.to(device))
        if "kl" not in aux:
            return None
        total += float(aux["kl"]) * len(x)                       # the aux KL is the batch mean
        n += len(x)
        mu, logvar = model.generator.posterior
        mus.append(mu.float().cpu()), logvars.append(logvar.float().cpu())
    nats = total / max(n, 1)
    mi = mutual_information(torch.cat(mus), torch.cat(logvars))
    return {"kl_nats": nats, "kl_bits": nats / BIT, "mi_nats": mi, "mi_bits": mi / BIT,
            "mi_max_bits": math.log2(max(n, 1)), "collapsed": mi < BIT}


@torch.no_grad()
def inserted_scale(model, x) -> dict[str, list[float]]:
    """Per block, the mean norm of a prompt token the generator inserts ("prompts"), and of each part it names.
    A carried block (the generator returns None) inserts nothing: NaN."""
    model.eval()
    gen, seen = model.generator, {}
    original = gen.forward

    def forward(i, tokens, prompts, aux):
        out = original(i, tokens, prompts, aux)
        parts = {"prompts": out, **(gen.parts(i, tokens, prompts) if out is not None else {})}
        for name, t in parts.items():
            seen.setdefault(name, [float("nan")] * len(model.vit.blocks))[i] = \
                float("nan") if t is None else t.float().norm(dim=-1).mean().item()
        return out
    gen.forward = forward
    try:
        model(x)
    finally:
        del gen.forward
    return seen


def loss_balance(rows: list[dict], weights: dict[str, float]) -> list[dict]:
    """Per epoch: the cross-entropy, and each auxiliary term raw and weighted (w · raw), from metrics.jsonl rows."""
    return [{"epoch": r["epoch"], "ce": r["ce"], **{k: r[k] for k in weights if k in r},
             **{f"{k}_weighted": w * r[k] for k, w in weights.items() if k in r}} for r in rows]


def cheap(model, samples, device, bf16: bool) -> dict:
    """What every training run reports in summary.json about its generator: the swap test and the latent's
    information on the given split (the validation split: no test image is read). Nothing for a generator whose
    prompts do not depend on the image (`reads_image` False: VPT, DA-VPT): its swap test could only find 0, and cost
    three passes over the split (about 4 s of a 40-s lesson run)."""
    if model.generator is None or not model.generator.reads_image:
        return {}
    loader = mixed_loader(samples)
    out = {"swap": swap_test(model, loader, device, bf16)}
    info = latent_information(model, loader, device)
    if info is not None:
        out["latent"] = info
    return out
