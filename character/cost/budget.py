"""The price of a build before it starts (`character plan`, `--max-cost`) and its spend after it (the build
summary, `--json`, the nightly table): tokens per stage and model, priced with the price table."""

from __future__ import annotations

from typing import Callable

from character.config import PipelineConfig
from character.cost.estimate import ApproxRenderer, Calibration, StageEstimate, estimate, total_tokens
from character.cost.meter import KINDS
from character.cost.prices import PriceTable, is_local_model, load_prices
from character.errors import UserError

# Rough throughput for the duration estimate, when no earlier build of this backend measured it
# (seconds per token of each kind). tiny: measured on 2 CPU cores. Tinker: tens of requests in flight.
_RATES = {
    "local-tiny": {"prefill": 1.5e-4, "sample": 1.5e-4, "train": 3.5e-4},
    "local": {"prefill": 2e-4, "sample": 2e-2, "train": 2e-3},
    "tinker": {"prefill": 1 / 20000, "sample": 1 / 1500, "train": 1 / 5000},
}


def renderers_for(cfg: PipelineConfig) -> Callable[[str], object]:
    """Each model's chat renderer: the model's own tokenizer where it is here (local models; a Tinker model
    whose tokenizer is in the Hugging Face cache), else ~4 characters per token."""
    from character.train.families import renderer_for

    cache: dict[str, object] = {}

    def renderer(name: str):
        if name not in cache:
            cache[name] = _renderer(cfg, name, renderer_for)
        return cache[name]

    return renderer


def _renderer(cfg: PipelineConfig, name: str, renderer_for):
    """The renderer the build will use for `name` (the family's, chosen by name as the stages do)."""
    if cfg.backend == "local":
        from character.backend.local_model import load_tokenizer, resolve_model
        from character.settings import Workspace

        return renderer_for(load_tokenizer(str(resolve_model(name, Workspace(cfg.workdir)))), name)
    try:
        from transformers import AutoTokenizer

        return renderer_for(AutoTokenizer.from_pretrained(name, local_files_only=True), name)
    except Exception:  # noqa: BLE001 - not cached here (or no chat template): count characters instead
        return ApproxRenderer()


def priced(tokens: dict[str, dict], prices: PriceTable) -> dict:
    """{"tokens": {model: {...}}, "cost": dollars or None, "unpriced": [...]} for one stage or a whole build."""
    tokens = {m: {k: int(t.get(k, 0)) for k in KINDS} for m, t in tokens.items()}
    cost, unpriced = prices.cost(tokens)
    return {"tokens": tokens, "cost": None if cost is None else round(cost, 4), "unpriced": unpriced}


def _seconds(cfg: PipelineConfig, stage: StageEstimate, cal: Calibration) -> float:
    key = cfg.backend if cfg.backend == "tinker" or cfg.base_model != "tiny" else "local-tiny"
    rates = cal.rates.get(stage.stage) or _RATES[key]
    return sum(row.get(k, 0) * rates[k] for row in stage.tokens.values() for k in KINDS)


def build_plan(cfg: PipelineConfig, renderer_for: Callable[[str], object] | None = None, prices=None) -> dict:
    """What `character plan --json` prints: per stage the estimated tokens, cost and rough duration, and
    the totals, with where the figures came from."""
    prices = prices or load_prices()
    cal = Calibration.from_workspace(cfg.workdir, cfg.backend, cfg.max_new_tokens)
    stages = estimate(cfg, renderer_for or renderers_for(cfg), cal)
    rows = [{"stage": s.stage, **priced(s.tokens, prices), "seconds": round(_seconds(cfg, s, cal))} for s in stages]
    total = priced(total_tokens(stages), prices)
    return {
        "persona": cfg.constitution().name,
        "scale": cfg.scale,
        "mode": cfg.mode,
        "backend": cfg.backend,
        "base_model": cfg.base_model,
        "teacher_model": cfg.teacher_model or cfg.base_model,
        "stages": rows,
        "total": {**total, "seconds": sum(r["seconds"] for r in rows)},
        "not_estimated": ["eval"] if cfg.evaluate else [],
        "answers_from": cal.source or "defaults (no earlier build of these models in the workspace)",
        "prices": {"table": prices.path, "as_of": prices.as_of},
    }


def check_budget(plan: dict, max_cost: float) -> None:
    """Refuse a build whose estimated cost is over `max_cost` dollars, or cannot be priced."""
    total = plan["total"]
    if total["unpriced"]:
        raise UserError(
            f"--max-cost {max_cost:g}: no price for {', '.join(total['unpriced'])} in the price table "
            f"{plan['prices']['table']}; add it there (or set CHARACTER_PRICE_TABLE) to check the budget"
        )
    if total["cost"] > max_cost:
        worst = max(plan["stages"], key=lambda s: s["cost"] or 0)
        raise UserError(
            f"the estimated cost ${total['cost']:.2f} is over --max-cost ${max_cost:.2f} "
            f"(largest stage: {worst['stage']} ${worst['cost']:.2f}); `character plan` shows the estimate per stage"
        )


# -- what a build counted ----------------------------------------------------------------------------
def spent(record: dict, prices: PriceTable | None = None) -> dict | None:
    """The tokens each stage of a build counted and their cost (None: the build counted none)."""
    stages = {k: st["tokens"] for k, st in (record.get("stages") or {}).items() if st.get("tokens")}
    if not stages:
        return None
    prices = prices or load_prices()
    out = {k: priced(tokens, prices) for k, tokens in stages.items()}
    total: dict[str, dict] = {}
    for tokens in stages.values():
        for model, row in tokens.items():
            acc = total.setdefault(model, {k: 0 for k in KINDS})
            for k in KINDS:
                acc[k] += row.get(k, 0)
    local = all(is_local_model(m) for m in total)
    return {
        "stages": out,
        "total": priced(total, prices),
        "prices": {"table": prices.path, "as_of": prices.as_of},
        **({"note": "local models: tokens counted, cost 0"} if local else {}),
    }
