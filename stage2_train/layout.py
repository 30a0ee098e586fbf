"""The parallel layout of a stage-2 job: one object with the TP / SP / CP / DP sizes, this rank's
position and its process groups, built once (`dist.init_parallel`) and passed to everything that
splits or reduces (the TP/SP and CP plans, the grad norm, data parallelism, EMA, checkpoints).

    world = tp * cp * dp   (no pipeline parallelism)
    megatron's default order tp-cp-ep-dp-pp: the ranks of one TP group are contiguous, a CP group
    strides by tp, a DP group by tp * cp:
    world 4, tp 2        -> TP groups [0,1] [2,3], DP groups [0,2] [1,3]
    world 4, tp 2, cp 2  -> TP groups [0,1] [2,3], CP groups [0,2] [1,3], DP size 1
    world 8, tp 2, cp 2  -> TP [0,1] .., CP [0,2] [1,3] [4,6] [5,7], DP [0,4] [1,5] [2,6] [3,7]
The data loader splits over DP only (all ranks of one TP x CP group read the same batch); gradients
are reduced over the DP x CP group (`dp_cp_group`, parameters are replicated over CP).

Also the layout checks: each impossible layout is one LayoutError line naming the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from osp.common.errors import OspError


class LayoutError(OspError, ValueError):
    """A parallel layout that does not fit the world size or the model (parallel.tp, parallel.sp, parallel.cp)."""


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0  # excludes CP: the loader's rank
    sp: bool = False
    cp: int = 1
    cp_rank: int = 0
    # process groups (None: a single-process layout, nothing to communicate)
    tp_group: Any = field(default=None, compare=False, repr=False)
    cp_group: Any = field(default=None, compare=False, repr=False)
    dp_group: Any = field(default=None, compare=False, repr=False)
    dp_cp_group: Any = field(default=None, compare=False, repr=False)  # the gradient-reduction group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __deepcopy__(self, memo) -> Layout:  # immutable, and process groups are handles: a copied model shares it
        return self

    def sizes(self) -> dict[str, Any]:
        """The sizes a checkpoint records (a resume at another layout names what changed)."""
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "sp": self.sp, "world": self.world}


def check_context_parallel(heads: int, tokens: int | None, tp: int, cp: int, sp: bool) -> None:
    """One-line LayoutError for a CP layout the DiT cannot run."""
    if cp < 1:
        raise LayoutError(f"parallel.cp={cp} must be >= 1")
    if heads % (tp * cp):
        raise LayoutError(
            f"parallel.tp x parallel.cp = {tp} x {cp} must divide the DiT's {heads} attention heads (Ulysses splits heads "
            f"over TP x CP); choose tp*cp among the divisors of {heads}"
        )
    split = cp * (tp if sp else 1)
    if tokens is not None and cp > 1 and tokens % split:
        what = f"cp x tp = {cp} x {tp}" if sp and tp > 1 else f"cp={cp}"
        raise LayoutError(
            f"context parallelism splits the {tokens} video tokens per sample (T*H/2*W/2) over {what} ranks, which does not "
            "divide; change parallel.cp (or the clip size)"
        )


def check_layout(world: int, tp: int, sp: bool, heads: int, tokens: int | None = None, cp: int = 1) -> None:
    """Raise a LayoutError for an impossible (world, tp, sp, cp) on a DiT with `heads` and `tokens` per sample."""
    if cp < 1:
        raise LayoutError(f"parallel.cp={cp} must be >= 1")
    if tp < 1 or world % (tp * cp):
        what = f"parallel.tp x parallel.cp = {tp} x {cp}" if cp > 1 else f"parallel.tp={tp}"
        raise LayoutError(
            f"world size {world} is not divisible by {what}; launch a multiple of {tp * cp} processes "
            f"(NNODES x GPUS_PER_NODE with make train) or change {'parallel.tp / parallel.cp' if cp > 1 else 'parallel.tp'}"
        )
    if heads % tp:
        raise LayoutError(
            f"parallel.tp={tp} must divide the DiT's {heads} attention heads; choose a divisor of {heads}"
        )
    if sp and tp == 1:
        raise LayoutError("parallel.sp=true needs parallel.tp > 1; set parallel.sp=false")
    if sp and tokens is not None and tokens % tp:
        raise LayoutError(
            f"sequence parallelism splits the {tokens} video tokens per sample over tp={tp} ranks, which does not divide; "
            "choose a tp dividing T*H/2*W/2, or set parallel.sp=false"
        )
    if cp > 1:
        check_context_parallel(heads, tokens, tp, cp, sp)


def check_sample_layout(world: int, sp: bool, heads: int) -> None:
    """`osp sample` under torchrun splits the DiT over all `world` ranks (TP = world): raise a
    one-line LayoutError for a world that cannot split `heads`, or --sp without several ranks."""
    if sp and world < 2:
        raise LayoutError("--sp needs several ranks: launch with torchrun --nproc_per_node N (N > 1) or drop --sp")
    if heads % world:
        raise LayoutError(
            f"tensor-parallel sampling splits the DiT's {heads} attention heads over {world} ranks, which does not divide; "
            f"launch torchrun --nproc_per_node with a divisor of {heads}"
        )
