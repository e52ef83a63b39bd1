"""The ``pyro-lunet`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .datasets import gaussian_mixture, gaussian_mixture_log_prob
from .training import fit_density
from .transforms import lu_net


def demo(args: argparse.Namespace) -> int:
    """Fits an LU-Net density model to the built-in 2-D Gaussian mixture."""
    torch.manual_seed(args.seed)
    data = gaussian_mixture(args.samples, seed=args.seed)
    test = gaussian_mixture(args.samples // 4, seed=args.seed + 1)
    flow = lu_net(2, num_blocks=args.blocks, product="inverse")
    print(
        f"Fitting LU-Net ({args.blocks} blocks, {sum(p.numel() for p in flow.parameters())} "
        f"parameters) to {len(data)} draws of an 8-component Gaussian mixture"
    )
    start = time.perf_counter()
    result = fit_density(
        flow, data, epochs=args.epochs, batch_size=256, lr=args.lr, seed=args.seed,
        progress=not args.quiet,
    )  # fmt: skip
    with torch.no_grad():
        test_nll = -result.model.log_prob(test).mean().item()
        entropy = -gaussian_mixture_log_prob(test).mean().item()
        gaussian = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T))
        gaussian_nll = -gaussian.log_prob(test).mean().item()
    print(f"held-out NLL: {test_nll:.4f} nats")
    print(f"  for scale: best single Gaussian {gaussian_nll:.4f}, true density {entropy:.4f}")
    print(f"best validation epoch {result.best_epoch + 1}, {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-lunet", description="Structured invertible linear flows for Pyro."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    p.add_argument("--samples", type=int, default=20000, help="training draws")
    p.add_argument("--blocks", type=int, default=8, help="LU-Net blocks")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
