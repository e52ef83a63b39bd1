"""The seed papers' image experiments in miniature: channel mixers and small image flows.

Two parts, one run, one machine (printed):

1. **Channel-mixer step time** (Glow's 1x1 convolution with each family's
   layer, :func:`pyro_lunet.channel_mixer`, ``role="density"``) against Pyro's
   ``GeneralizedChannelPermute`` at C = 96 (CDFlow's timing size) and a larger
   C: a density training step (scoring pass, log-det, backward) and a no-grad
   sampling pass, on B x C x H x W activations. Interleaved rounds, medians.
   A third column times the same scoring map as one ``conv2d`` with the
   already-assembled dense matrix (the layout question of issue 14: rows
   through the family kernel vs a 1x1 convolution).

2. **Density fits** with :func:`pyro_lunet.image_flow` (2 levels, the same
   couplings and budget for every row) on scikit-learn's bundled digits
   (1x8x8, 17 grey levels), the digits with one fixed random permutation of
   the 64 pixels (ButterflyFlow's permuted-pixel experiment; with and without
   a whole-image butterfly), and 3x8x8 colour patches cut from scikit-learn's
   two bundled photos (256 grey levels, like BSDS300 patches). Rows: every
   family's channel mixer, Pyro's ``GeneralizedChannelPermute``, a fixed
   channel reversal (RealNVP-style), and normflows' Glow (``MultiscaleFlow`` of
   ``GlowBlock``s: the same levels, steps, coupling network and hidden width, the
   same data, dequantization, logit map, loop and formula; skipped when normflows is
   not installed). Metric: test bits/dim in the data's
   discrete space, ``(-log p(u) + D log L) / (D log 2)`` with ``u = (x +
   U[0,1)) / L`` and the logit map counted in ``log p``
   (:func:`pyro_lunet.bits_per_dim`), averaged over 4 dequantization draws,
   and the median training step time.

3. **Periodic signals** (made in code: sums of three sinusoids with random
   integer frequencies, amplitudes and phases, plus noise; D = 64 by
   default), where CDFlow and ButterflyFlow claim circulant and butterfly
   structure helps: LU, butterfly and circulant-diagonal ``activation_flow`` flows
   at about equal parameter budgets, test NLL in nats next to the
   full-covariance Gaussian's.

Nothing is downloaded. ``--quick`` takes minutes on 2 cores (150 fit steps,
300 periodic steps); the default trains ~3x longer, ``--full`` 10x;
``--fit-steps`` and ``--periodic-steps`` set either directly, ``--seeds N`` repeats
every fit with N seeds (mean and standard deviation).
Run ``PYTHONPATH=. python benchmarks/bench_images.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import time
import warnings

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import GeneralizedChannelPermute, Permute

from pyro_lunet import channel_mixer, families, image_flow
from pyro_lunet.cli.bench import median_times
from pyro_lunet.image_flows import bits_per_dim, dequantize, unit_interval


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except Exception:  # no lscpu: the platform's word
        model = platform.processor() or platform.machine()
    return (
        f"{model}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


# --------------------------------------------------------------- part 1: mixers
def _mixers(channels: int) -> dict:
    torch.manual_seed(0)
    made = {fam: channel_mixer(channels, fam, init="orthogonal") for fam in families()}
    made["pyro GeneralizedChannelPermute"] = GeneralizedChannelPermute(channels)
    with torch.no_grad():  # off the initial values, as after some training
        for m in made.values():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return made


def _time_mixers(channels, batch, size, repeats, min_seconds):
    mixers = _mixers(channels)
    x = torch.randn(batch, channels, size, size)

    def density_step(m):
        def fn():
            y = x.clone()  # a fresh tensor: no cache answers
            z = m.inv(y)
            loss = 0.5 * z.square().sum() - m.log_abs_det_jacobian(z, y).sum()
            loss.backward()

        return fn

    def sample(m):
        def fn():
            with torch.no_grad():
                m(x.clone())

        return fn

    steps = median_times({k: density_step(m) for k, m in mixers.items()}, repeats, min_seconds)
    samples = median_times({k: sample(m) for k, m in mixers.items()}, repeats, min_seconds)
    # Layout: the scoring map of the LU mixer through its row kernel vs one conv2d
    # with the assembled dense matrix (the best case for conv2d: W built once).
    lu = mixers["lu"]
    with torch.no_grad():
        # scoring map z = A (x - b) with A = weight()^-1: A = inv of the forward matrix
        dense = torch.linalg.inv(lu.weight())[:, :, None, None].contiguous()
        bias = lu.layer.bias.detach()[None, :, None, None]

    def rows():
        with torch.no_grad():
            lu.inv(x.clone())

    def conv():
        with torch.no_grad():
            F.conv2d(x - bias, dense)

    layout = median_times({"rows": rows, "conv2d": conv}, repeats, min_seconds)
    with torch.no_grad():
        torch.testing.assert_close(
            lu.inv(x.clone()), F.conv2d(x - bias, dense), rtol=1e-4, atol=1e-4
        )
    return steps, samples, layout


def part_mixers(channel_list, batch, size, repeats, min_seconds):
    print(
        f"\n## 1. Channel-mixer step, B={batch}, H=W={size}, float32 "
        "(ms; ratio = Pyro GCP / ours)\n"
    )
    for channels in channel_list:
        steps, samples, layout = _time_mixers(channels, batch, size, repeats, min_seconds)
        gcp = "pyro GeneralizedChannelPermute"
        print(f"C = {channels} ({batch * size * size} pixel rows)\n")
        print("| mixer | density step | ratio | no-grad sample | ratio |")
        print("|---|---|---|---|---|")
        for name in steps:
            print(
                f"| {name} | {1e3 * steps[name]:.3f} | {steps[gcp] / steps[name]:.2f}x "
                f"| {1e3 * samples[name]:.3f} | {samples[gcp] / samples[name]:.2f}x |"
            )
        print(
            f"\nLU scoring map, no grad: rows through the family kernel "
            f"{1e3 * layout['rows']:.3f} ms vs conv2d 1x1 with the assembled W "
            f"{1e3 * layout['conv2d']:.3f} ms\n"
        )


# ---------------------------------------------------------------- part 2: fits
def digits_data():
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)
    return images, 17  # (1797, 1, 8, 8), grey levels 0..16


def permuted(images, seed=0):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(images[0].numel(), generator=gen)
    return images.flatten(1)[:, perm].reshape(images.shape)


def patches_data(count=4000, seed=0):
    from sklearn.datasets import load_sample_images

    gen = torch.Generator().manual_seed(seed)
    out = []
    photos = [torch.tensor(im).permute(2, 0, 1).float() for im in load_sample_images().images]
    for i in range(count):
        photo = photos[i % len(photos)]
        _, h, w = photo.shape
        top = int(torch.randint(0, h - 8, (), generator=gen))
        left = int(torch.randint(0, w - 8, (), generator=gen))
        out.append(photo[:, top : top + 8, left : left + 8])
    return torch.stack(out), 256  # (count, 3, 8, 8), 8-bit


def _split(images, test_fraction=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    cut = int(len(images) * (1 - test_fraction))
    return images[order[:cut]], images[order[cut:]]


def _reverse(channels):
    return Permute(torch.arange(channels - 1, -1, -1), dim=-3)


def _model(flow, shape):
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(3)
    return dist.TransformedDistribution(base, [flow, unit_interval(0.05)])


def _train_and_score(log_prob, module, images, levels, steps, batch, seed):
    """Adam (lr 2e-3) on ``-log_prob(u)`` of freshly dequantized batches, then the test
    bits/dim (:func:`bits_per_dim`, the mean of 4 dequantization draws) and the median
    step time. ``log_prob`` maps ``u`` in ``[0, 1)^D`` to ``log p(u)`` (nats, per image).
    The same loop for every row, so only the model differs."""
    train, test = _split(images)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    times = []
    module.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=gen)
        u = dequantize(train[idx], levels, generator=gen)
        start = time.perf_counter()
        opt.zero_grad()
        loss = -log_prob(u).mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    module.eval()
    bpd = []
    with torch.no_grad():
        for _ in range(4):
            u = dequantize(test, levels, generator=gen)
            bpd.append(bits_per_dim(log_prob(u), test[0].numel(), levels).mean().item())
    params = sum(p.numel() for p in module.parameters())
    return statistics.mean(bpd), statistics.median(times), params


def fit(images, levels, layer, steps, batch, hidden, steps_per_level, image_mixer=None, seed=0):
    torch.manual_seed(seed)
    shape = tuple(images.shape[1:])
    flow = image_flow(
        shape,
        num_levels=2,
        steps_per_level=steps_per_level,
        layer=layer,
        hidden_channels=hidden,
        image_mixer=image_mixer,
    )
    model = _model(flow, shape)
    return _train_and_score(model.log_prob, flow, images, levels, steps, batch, seed)


def normflows_glow(shape, hidden, steps_per_level, num_levels=2):
    """normflows' Glow (``GlowBlock``: affine coupling with a 3-1-3 conv net, LU 1x1
    convolution, actnorm; ``Squeeze``, ``Merge``; learned diagonal Gaussian bases) in
    ``MultiscaleFlow``, at the architecture of our rows: ``num_levels`` levels of
    ``steps_per_level`` blocks, level ``l`` (1 = finest) on ``2^(l+1) C`` channels of
    ``H/2^l x W/2^l``, half of them factored out between levels."""
    import normflows as nf

    # normflows' LU 1x1 convolution calls torch.lu, deprecated in torch 2: its warning,
    # once per run, is about normflows' code and would only clutter the table.
    warnings.filterwarnings("ignore", message="torch.lu is deprecated")
    c, h, w = shape
    q0, flows, merges = [], [], []
    # MultiscaleFlow lists levels from the coarsest (sampling order): level L first.
    for level in range(num_levels, 0, -1):
        channels, size = c * 2 ** (level + 1), (h // 2**level, w // 2**level)
        blocks = [nf.flows.GlowBlock(channels, hidden) for _ in range(steps_per_level)]
        flows.append([*blocks, nf.flows.Squeeze()])  # ends at (channels / 4, 2 size)
        if level == num_levels:
            q0.append(nf.distributions.DiagGaussian((channels, *size)))
        else:  # the half factored out at this level, merged back in (sampling direction)
            q0.append(nf.distributions.DiagGaussian((channels // 2, *size)))
            merges.append(nf.flows.Merge())
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def fit_normflows_glow(images, levels, steps, batch, hidden, steps_per_level, seed=0):
    """The same fit as :func:`fit` with normflows' Glow in place of :func:`image_flow`:
    the same data, dequantization, logit map (:func:`unit_interval`, its log-det counted
    here), loop and bits/dim formula."""
    torch.manual_seed(seed)
    glow = normflows_glow(tuple(images.shape[1:]), hidden, steps_per_level)
    logit = unit_interval(0.05)

    def log_prob(u):
        v = logit.inv(u)  # the logit space the flow models
        ldj = logit.log_abs_det_jacobian(v, u).flatten(1).sum(1)  # dims of u per dim of v
        return glow.log_prob(v, None) - ldj

    return _train_and_score(log_prob, glow, images, levels, steps, batch, seed)


def part_fits(datasets, steps, batch, hidden, steps_per_level, seeds=1):
    spread = f", mean +- standard deviation over seeds 0..{seeds - 1}" if seeds > 1 else ""
    print(
        f"\n## 2. image_flow fits: 2 levels x {steps_per_level} steps, hidden {hidden}, "
        f"{steps} Adam steps (lr 2e-3) of batch {batch}; test bits/dim (lower is better)"
        f"{spread}; the seed sets the initialization and the batches, not the split\n"
    )

    def ours(layer, whole=None, only=None):
        def run(data_name, images, levels, seed):
            if only is not None and data_name != only:
                return None
            return fit(images, levels, layer, steps, batch, hidden, steps_per_level, whole, seed)

        return run

    rows = [(fam, ours(fam)) for fam in families()]
    rows.append(("pyro GeneralizedChannelPermute", ours(GeneralizedChannelPermute)))
    rows.append(("fixed reversal (RealNVP)", ours(_reverse)))
    rows.append(("lu + whole-image butterfly", ours("lu", "butterfly", "permuted digits")))
    if importlib.util.find_spec("normflows") is not None:

        def glow(data_name, images, levels, seed):
            return fit_normflows_glow(images, levels, steps, batch, hidden, steps_per_level, seed)

        rows.append(("normflows Glow (MultiscaleFlow)", glow))
    else:
        print("(normflows is not installed: no normflows Glow row)\n")
    names = list(datasets)
    print("| mixer | " + " | ".join(names) + f" | step ms ({names[0]}) | parameters ({names[0]}) |")
    print("|---" * (len(names) + 3) + "|")
    for name, run in rows:
        cells, first = [], None
        for data_name, (images, levels) in datasets.items():
            results = [run(data_name, images, levels, seed) for seed in range(seeds)]
            if results[0] is None:
                cells.append("")
                continue
            bpd = [r[0] for r in results]
            cell = f"{statistics.mean(bpd):.3f}"
            cells.append(cell + (f" +- {statistics.stdev(bpd):.3f}" if seeds > 1 else ""))
            first = first or (statistics.median(r[1] for r in results), results[0][2])
        step, params = first
        print(
            f"| {name} | " + " | ".join(cells) + f" | {1e3 * step:.1f} | {params:,} |", flush=True
        )


# ------------------------------------------------------- part 3: periodic signals
def periodic_data(count, dim, seed=0):
    """Sums of three sinusoids (random integer frequencies 1..8, amplitudes, phases) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(dim, dtype=torch.float32) / dim
    freq = torch.randint(1, 9, (count, 3, 1), generator=gen).float()
    amp = 0.5 + torch.rand(count, 3, 1, generator=gen)
    phase = 2 * torch.pi * torch.rand(count, 3, 1, generator=gen)
    clean = (amp * torch.sin(2 * torch.pi * freq * t + phase)).sum(1)
    return clean + 0.1 * torch.randn(count, dim, generator=gen)


def part_periodic(dim, steps, batch):
    """LU, butterfly and circulant activation flows at (about) equal parameter budgets."""
    from pyro_lunet import activation_flow

    data = periodic_data(6000, dim)
    train, test = data[:5000], data[5000:]
    mean = train.mean(0)
    cov = torch.cov((train - mean).T) + 1e-6 * torch.eye(dim)
    gauss = dist.MultivariateNormal(mean, cov).log_prob(test).mean().item()
    print(
        f"\n## 3. Periodic signals, D={dim} (sums of 3 sinusoids + noise), activation_flow "
        f"(LU-Net style) at ~equal parameter budgets, {steps} Adam steps of batch {batch}; "
        f"test NLL in nats (lower is better)\n"
    )
    print("| flow | layers | parameters | test NLL | step ms |")
    print("|---|---|---|---|---|")
    print(f"| full-covariance Gaussian (MLE) | - | {dim * (dim + 3) // 2:,} | {-gauss:.2f} | - |")
    configs = [
        ("lu", 1, {}),
        ("butterfly", 9, {}),
        ("circulant", 15, {"num_factors": 4}),
    ]
    for fam, blocks, kw in configs:
        torch.manual_seed(0)
        flow = activation_flow(dim, blocks, fam, role="density", layer_kwargs=kw)
        model = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), flow)
        opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            x = train[torch.randint(0, len(train), (batch,), generator=gen)]
            start = time.perf_counter()
            opt.zero_grad()
            (-model.log_prob(x).mean()).backward()
            opt.step()
            times.append(time.perf_counter() - start)
        with torch.no_grad():
            nll = -model.log_prob(test).mean().item()
        params = sum(p.numel() for p in flow.parameters())
        print(
            f"| {fam} | {blocks + 1} | {params:,} | {nll:.2f} | "
            f"{1e3 * statistics.median(times):.1f} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training (minutes)")
    parser.add_argument("--full", action="store_true", help="train 10x longer than --quick")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, nargs="+", default=[96, 512])
    parser.add_argument("--skip-fits", action="store_true")
    parser.add_argument("--skip-mixers", action="store_true")
    parser.add_argument("--skip-periodic", action="store_true")
    parser.add_argument("--periodic-dim", type=int, default=64)
    parser.add_argument(
        "--periodic-steps", type=int, help="Adam steps per periodic-signal flow (overrides)"
    )
    parser.add_argument("--fit-steps", type=int, help="Adam steps per image fit (overrides)")
    parser.add_argument("--seeds", type=int, default=1, help="image fits per row and data set")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench_images on {machine()}")
    if not args.skip_mixers:
        part_mixers(args.channels, batch=8, size=8, repeats=5, min_seconds=0.05)
    if not args.skip_fits:
        digits, levels = digits_data()
        datasets = {
            "digits": (digits, levels),
            "permuted digits": (permuted(digits), levels),
            "patches 3x8x8": patches_data(),
        }
        steps = args.fit_steps or (150 if args.quick else 1500 if args.full else 400)
        part_fits(datasets, steps=steps, batch=64, hidden=32, steps_per_level=2, seeds=args.seeds)
    if not args.skip_periodic:
        steps = args.periodic_steps or (300 if args.quick else 3000 if args.full else 1000)
        part_periodic(args.periodic_dim, steps=steps, batch=128)


if __name__ == "__main__":
    main()
